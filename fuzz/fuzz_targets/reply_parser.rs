//! Fuzzes `Reply::parse`, the client side's reader of server replies.
//!
//! Arbitrary bytes must never panic it. When it returns a reply it must have
//! consumed a prefix that ends a line; it must be incremental (every shorter
//! prefix asks for more input, what follows does not matter); the enhanced
//! code must match the reply class; and rendering the reply must give bytes
//! that parse back to a reply that renders the same (text is sanitised on
//! the way out, so the fixed point is the rendered form).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::smtp::reply::{Reply, MAX_REPLY_LINE, MAX_REPLY_LINES};

fuzz_target!(|data: &[u8]| {
    let Ok(Some((reply, n))) = Reply::parse(data) else {
        return;
    };
    assert!(n > 0 && n <= data.len());
    assert_eq!(data[n - 1], b'\n', "a reply ends with a line end");
    assert!((200..600).contains(&reply.code()));
    if let Some(e) = reply.enhanced() {
        assert_eq!(u16::from(e.class), reply.code() / 100, "class mismatch");
    }
    let lines = reply.lines().count();
    assert!((1..=MAX_REPLY_LINES).contains(&lines));
    assert!(reply.lines().all(|l| l.len() <= MAX_REPLY_LINE * 3));

    // What follows the reply does not change it.
    assert_eq!(Reply::parse(&data[..n]), Ok(Some((reply.clone(), n))));
    // Incremental: any shorter prefix needs more input.
    let step = (n / 256).max(1);
    for p in (0..n).step_by(step).chain(std::iter::once(n - 1)) {
        assert_eq!(Reply::parse(&data[..p]), Ok(None), "prefix of {p} of {n}");
    }

    // Render / re-parse reaches a fixed point. Invalid UTF-8 in the text
    // becomes U+FFFD (3 bytes each), so a rendered line may outgrow the
    // parser's line bound; such a reply only has to be refused as too long.
    let wire = reply.to_bytes();
    if wire
        .split(|&b| b == b'\n')
        .any(|l| l.len() + 1 > MAX_REPLY_LINE)
    {
        assert_eq!(
            Reply::parse(&wire),
            Err(sluice::smtp::reply::ReplyParseError::TooLong)
        );
        return;
    }
    let (again, used) = Reply::parse(&wire)
        .unwrap_or_else(|e| panic!("rendered {wire:?} does not parse: {e}"))
        .unwrap_or_else(|| panic!("rendered {wire:?} is incomplete"));
    assert_eq!(used, wire.len());
    assert_eq!(again.code(), reply.code());
    assert_eq!(again.enhanced(), reply.enhanced());
    assert_eq!(again.to_bytes(), wire, "rendering is not a fixed point");
});
