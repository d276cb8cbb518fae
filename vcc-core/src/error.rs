//! Reporting errors the way every binary of this project does: one line, the failed operation
//! first, then each cause once.
//!
//! This is the workspace's one error formatter. It prints every message of the chain, so no
//! error may repeat its cause in its own message (`{source}` or `{0}` of a cause in an
//! `#[error]` string): the cause belongs in `#[source]`, and is printed here.

/// `what failed: why: why` on one line (line breaks inside a message become spaces).
pub fn one_line(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s.replace(['\r', '\n'], " ")
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("creating the overlay")]
    struct Outer(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("starting domain 'web'")]
    struct Top(#[source] Middle);

    #[derive(Debug, thiserror::Error)]
    #[error("preparing disk vda")]
    struct Middle(#[source] std::io::Error);

    #[test]
    fn causes_follow_on_one_line() {
        let e = Outer(std::io::Error::other("No space left\non device"));
        assert_eq!(super::one_line(&e), "creating the overlay: No space left on device");
    }

    #[test]
    fn a_chain_of_three_prints_each_message_exactly_once() {
        let e = Top(Middle(std::io::Error::other("permission denied")));
        let line = super::one_line(&e);
        assert_eq!(line, "starting domain 'web': preparing disk vda: permission denied");
        for m in ["starting domain 'web'", "preparing disk vda", "permission denied"] {
            assert_eq!(line.matches(m).count(), 1, "{m} in {line}");
        }
    }

    #[test]
    fn a_cause_that_repeats_words_of_its_context_is_still_printed() {
        // The old formatter dropped a cause whose text appeared in the line already.
        let e = Outer(std::io::Error::other("overlay"));
        assert_eq!(super::one_line(&e), "creating the overlay: overlay");
    }
}
