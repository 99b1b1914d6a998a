//! Protocol errors: one variant per cause of a failed connection.
//!
//! Every variant maps to a fixed, bounded metric label through [`ProtocolError::reason`], so the
//! pipeline can count failures without labels that grow with peers. The variants deliberately
//! carry no data: the peer learns nothing beyond "the connection closed", and logs and metrics
//! stay bounded whatever the input.

/// Why a handshake or a record stream was rejected. Any of these ends the connection.
#[derive(thiserror::Error, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProtocolError {
    /// A MAC or AEAD tag did not verify: a wrong pre-shared key, a modified byte, or a dropped,
    /// duplicated or reordered record (the nonce no longer matches).
    #[error("authentication failed (bad MAC or AEAD tag)")]
    BadMac,
    /// Bytes that cannot be parsed: an unknown flag or record type, a non-empty END or
    /// KEY_UPDATE record, a bad ABORT or OPEN payload, a record out of order (anything but OPEN
    /// first from the initiator, OPEN anywhere else), a record after END or ABORT, a low-order
    /// X25519 key, or a caller passing a buffer that does not fit the record.
    #[error("malformed message")]
    Malformed,
    /// The initiator's hello names a key id that this side has not loaded.
    #[error("hello names a key id that is not loaded")]
    UnknownKey,
    /// The initiator's Finished did not verify: a recorded session replayed into a new
    /// connection (or a Finished that was modified in flight).
    #[error("handshake replay detected (Finished did not verify)")]
    Replay,
    /// The stream ended before the authenticated END record, or a handshake message was cut.
    #[error("stream truncated before END")]
    Truncated,
    /// A record longer than `MAX_PAYLOAD`, or a direction that has reached its per-key record
    /// limit without a KEY_UPDATE.
    #[error("record too large or per-key record limit reached")]
    TooLarge,
    /// The peer speaks another version of the sealpipe protocol (its first byte is a plausible
    /// version number, 1 to 15, other than ours).
    #[error("unsupported protocol version")]
    Version,
    /// The initiator's hello authenticated but did not offer forward secrecy, which this
    /// responder requires (`forward_secrecy = "require"`).
    #[error("the peer did not offer forward secrecy, which this side requires")]
    ForwardSecrecyRequired,
    /// The first byte is not a sealpipe version at all: plaintext or another protocol sent to a
    /// sealed port (or, on the encrypt side, a target that is not a decrypt side).
    #[error("not a sealpipe peer")]
    NotSealpipe,
}

impl ProtocolError {
    /// The metric label for this error: short, fixed, `snake_case`.
    pub fn reason(&self) -> &'static str {
        match self {
            ProtocolError::BadMac => "bad_mac",
            ProtocolError::Malformed => "malformed",
            ProtocolError::UnknownKey => "unknown_key",
            ProtocolError::Replay => "replay",
            ProtocolError::Truncated => "truncated",
            ProtocolError::TooLarge => "too_large",
            ProtocolError::Version => "version",
            ProtocolError::ForwardSecrecyRequired => "fs_required",
            ProtocolError::NotSealpipe => "not_sealpipe",
        }
    }

    /// Every variant, in declaration order (for pre-registering metric labels).
    pub const ALL: [ProtocolError; 9] = [
        ProtocolError::BadMac,
        ProtocolError::Malformed,
        ProtocolError::UnknownKey,
        ProtocolError::Replay,
        ProtocolError::Truncated,
        ProtocolError::TooLarge,
        ProtocolError::Version,
        ProtocolError::ForwardSecrecyRequired,
        ProtocolError::NotSealpipe,
    ];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_distinct_metric_labels() {
        let mut seen: Vec<&str> = ProtocolError::ALL.iter().map(|e| e.reason()).collect();
        assert!(
            seen.iter()
                .all(|r| r.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        );
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), ProtocolError::ALL.len());
    }
}
