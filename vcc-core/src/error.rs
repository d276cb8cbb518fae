//! Reporting errors the way every binary of this project does: one line, the failed operation
//! first, then each cause once.

/// `what failed: why: why` on one line, skipping a cause whose text is already in the line.
pub fn one_line(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("creating the overlay")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn causes_follow_on_one_line() {
        let e = Outer(std::io::Error::other("No space left\non device"));
        assert_eq!(super::one_line(&e), "creating the overlay: No space left on device");
    }
}
