//! [`Tag`]: what a timer or a deferred notification is for, as its handler reads it back.
//!
//! A handler and the components it owns (a `BufferEvent` per socket, a `ConnListener`) share
//! one stream of `on_timer` / `on_notify` calls. Their tags are two disjoint kinds, kept apart
//! by the type rather than by a bit layout every caller must avoid:
//! - the handler's own: [`Tag::new`] with any number the handler chooses, read back with
//!   [`Tag::value`];
//! - a component's: made only inside the reactor, naming the component, the source it serves
//!   and what it is for; the component recognises its own (`owns_tag`), and a handler's own
//!   tags are never among them.
//!
//! Invariants: a component tag never equals a handler tag; two components of different kinds,
//! or of one kind on different sources, never make equal tags. A tag is 8 bytes, so a timer
//! entry costs no more than with a bare `u64`.

/// What a timer or a deferred notification is for (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tag(Repr);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Repr {
    /// A handler's own tag.
    Own(u32),
    /// A component's tag.
    Component {
        component: Component,
        source: u8,
        kind: u8,
    },
}

/// The reactor's components that arm timers and defer work on their owner's behalf.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Component {
    BufferEvent,
    Listener,
}

impl Tag {
    /// A handler's own tag, `n` of the handler's choosing.
    pub const fn new(n: u32) -> Tag {
        Tag(Repr::Own(n))
    }

    /// The number of a handler's own tag; `None` for a component's.
    pub const fn value(self) -> Option<u32> {
        match self.0 {
            Repr::Own(n) => Some(n),
            Repr::Component { .. } => None,
        }
    }

    /// A component's tag: `kind` of what `component` does for `source`.
    pub(crate) const fn component(component: Component, source: u8, kind: u8) -> Tag {
        Tag(Repr::Component {
            component,
            source,
            kind,
        })
    }

    /// The kind of this tag if `component` made it for `source`.
    pub(crate) fn kind_for(self, component: Component, source: u8) -> Option<u8> {
        match self.0 {
            Repr::Component {
                component: c,
                source: s,
                kind,
            } if c == component && s == source => Some(kind),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handler_and_component_tags_never_meet() {
        assert_eq!(std::mem::size_of::<Tag>(), 8);
        let own = Tag::new(1);
        let bev = Tag::component(Component::BufferEvent, 1, 1);
        let listener = Tag::component(Component::Listener, 1, 1);
        assert_ne!(own, bev);
        assert_ne!(bev, listener, "same source and kind, different components");
        assert_eq!(own.value(), Some(1));
        assert_eq!(bev.value(), None);
        assert_eq!(bev.kind_for(Component::BufferEvent, 1), Some(1));
        assert_eq!(bev.kind_for(Component::BufferEvent, 0), None);
        assert_eq!(bev.kind_for(Component::Listener, 1), None);
        assert_eq!(own.kind_for(Component::BufferEvent, 1), None);
    }
}
