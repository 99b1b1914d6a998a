//! The `proxy_header` target: arbitrary bytes as what a load balancer sends ahead of its
//! client's, through the PROXY protocol parser (`sealpipe-proxy-header`).
//!
//! Invariants: nothing panics; a header is never longer than `MAX_HEADER_LEN`; the parser is
//! incremental and consistent — every strict prefix of an accepted header needs more, the
//! same header is found however many bytes follow it, and a refused prefix stays refused
//! whatever follows; an accepted header's addresses encode in its version and parse back to
//! themselves.

use sealpipe_proxy_header::{MAX_HEADER_LEN, Parse, encode, parse};

/// Prefix lengths to re-parse: every one up to 64, then a few dozen spread over the rest.
fn cuts(len: usize) -> impl Iterator<Item = usize> {
    let step = (len / 32).max(1);
    (0..len.min(64)).chain((64..len).step_by(step))
}

pub fn proxy_header(data: &[u8]) {
    let full = parse(data);
    if let Parse::Done { header, consumed } = full {
        assert!(consumed <= data.len() && consumed <= MAX_HEADER_LEN);
        // The same header with nothing after it, and with everything after it.
        assert_eq!(parse(&data[..consumed]), full);
        for n in cuts(consumed) {
            assert_eq!(
                parse(&data[..n]),
                Parse::NeedMore,
                "prefix {n} of {consumed}"
            );
        }
        if let Some(a) = header.addrs {
            let e = encode(header.version, Some(a));
            match parse(e.as_bytes()) {
                Parse::Done { header: back, .. } => {
                    assert_eq!(back.addrs, Some(a.normalized()));
                    assert_eq!(back.version, header.version);
                }
                other => panic!("re-encoded {:?} parsed as {other:?}", e),
            }
        }
    }
    for n in cuts(data.len()) {
        match parse(&data[..n]) {
            Parse::NeedMore => {}
            Parse::Invalid(_) => assert!(
                matches!(full, Parse::Invalid(_)),
                "prefix {n} refused, the whole input not: {full:?}"
            ),
            done @ Parse::Done { .. } => assert_eq!(done, full, "prefix {n}"),
        }
    }
}
