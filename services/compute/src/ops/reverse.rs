//! `Reverse`: the text with its extended grapheme clusters in reverse order, so combining marks
//! stay on their base letter and emoji sequences (flags, families, skin tones) stay whole.
//!
//! Segmentation is the costly part, so it is done only where it can matter. Between two ASCII
//! characters there is always a grapheme boundary except inside "\r\n" (Unicode UAX #29: every
//! rule that joins characters involves a non-ASCII one). ASCII stretches are reversed byte by
//! byte; only the stretches around non-ASCII characters go through the segmenter.

use unicode_segmentation::UnicodeSegmentation;

/// Texts up to this many bytes are reversed inline on the async runtime; longer ones go to the
/// CPU pool.
pub const INLINE_MAX_BYTES: usize = 64 * 1024;

/// `text` with its grapheme clusters reversed.
pub fn reverse(text: &str) -> String {
    let bytes = text.as_bytes();
    if bytes.is_ascii() && !bytes.contains(&b'\r') {
        let reversed: Vec<u8> = bytes.iter().rev().copied().collect();
        // Reversed ASCII is ASCII, so this conversion cannot fail.
        return String::from_utf8(reversed).unwrap_or_default();
    }
    let mut out = String::with_capacity(text.len());
    for piece in Pieces::new(text).rev_collect() {
        out.push_str(piece);
    }
    out
}

/// The naive reference: segment everything. Used by tests and benchmarks to check [`reverse`].
pub fn reverse_by_segmenting_everything(text: &str) -> String {
    text.graphemes(true).rev().collect()
}

/// Splits text into pieces that each are one or more whole grapheme clusters, cut only at
/// boundaries that are certain without segmentation.
struct Pieces<'a> {
    text: &'a str,
}

impl<'a> Pieces<'a> {
    fn new(text: &'a str) -> Self {
        Self { text }
    }

    /// Is there always a grapheme boundary between bytes `i - 1` and `i`?
    fn certain_boundary(bytes: &[u8], i: usize) -> bool {
        let (a, b) = (bytes[i - 1], bytes[i]);
        a.is_ascii() && b.is_ascii() && !(a == b'\r' && b == b'\n')
    }

    /// All grapheme clusters (or single ASCII bytes) in reverse order.
    fn rev_collect(self) -> Vec<&'a str> {
        let bytes = self.text.as_bytes();
        let mut pieces = Vec::new();
        let mut start = 0;
        while start < bytes.len() {
            // Find the next certain boundary after `start`.
            let mut end = start + 1;
            while end < bytes.len() && !Self::certain_boundary(bytes, end) {
                end += 1;
            }
            let stretch = &self.text[start..end];
            if end - start == 1 {
                pieces.push(stretch);
            } else {
                pieces.extend(stretch.graphemes(true));
            }
            start = end;
        }
        pieces.reverse();
        pieces
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_of_cases() {
        assert_eq!(reverse(""), "");
        assert_eq!(reverse("hello"), "olleh");
        // "e" + COMBINING ACUTE ACCENT + "a": the accent stays on the e.
        assert_eq!(reverse("e\u{301}a"), "ae\u{301}");
        // Two flags (regional indicator pairs) swap whole.
        let fr = "\u{1F1EB}\u{1F1F7}";
        let de = "\u{1F1E9}\u{1F1EA}";
        assert_eq!(reverse(&format!("{fr}{de}")), format!("{de}{fr}"));
        // A family emoji (ZWJ sequence) and a skin tone stay whole.
        let family = "\u{1F468}\u{200D}\u{1F469}\u{200D}\u{1F467}";
        let thumbs = "\u{1F44D}\u{1F3FD}";
        assert_eq!(
            reverse(&format!("a{family}b{thumbs}")),
            format!("{thumbs}b{family}a")
        );
        // CR LF is one cluster.
        assert_eq!(reverse("a\r\nb"), "b\r\na");
        assert_eq!(reverse("<script>"), ">tpircs<");
    }
}
