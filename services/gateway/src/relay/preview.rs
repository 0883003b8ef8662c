//! The event log's preview of a request: the first field of its protobuf message, scanned
//! from at most the first [`PREVIEW_BYTES`] of the frame (never a full decode).

use dlb::events::preview;

use super::FRAME_HEADER;

/// Bytes of a request read for its preview: the prefix, and room for the preview's characters
/// with their field's key and length.
pub(super) const PREVIEW_BYTES: usize = FRAME_HEADER + dlb::events::INPUT_PREVIEW_CHARS * 4 + 16;

/// The event's input preview of a request message with its 5-byte prefix (`start`: the whole
/// message when `complete`, else its first bytes). A compressed message is not decompressed
/// for it: its preview says so.
pub(super) fn framed_preview(op: &str, start: &[u8], complete: bool) -> String {
    match start.first() {
        Some(0) => input_preview(op, start.get(FRAME_HEADER..).unwrap_or_default(), complete),
        _ => "(compressed)".to_owned(),
    }
}

/// The event log's view of the input: the request's first field (the number, the text or n),
/// cut to the preview length, read without decoding the rest of the message. `start` is the
/// message, or only its start when `complete` is false.
pub(super) fn input_preview(op: &str, start: &[u8], complete: bool) -> String {
    match first_field(start, complete) {
        Some(Field::Varint(n)) => n.to_string(),
        Some(Field::Bytes { bytes, cut }) => {
            // A character cut in two at the end is dropped.
            let valid = match std::str::from_utf8(bytes) {
                Ok(text) => text,
                Err(e) => std::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or_default(),
            };
            let shown = preview(valid);
            if cut && !shown.ends_with('…') {
                format!("{shown}…")
            } else {
                shown
            }
        }
        // Absent: the field's default.
        None if op == "Fibonacci" => "0".to_owned(),
        None => String::new(),
    }
}

pub(super) enum Field<'a> {
    Varint(u64),
    /// A length-delimited field: its bytes, and whether it goes on past the end of what was
    /// read.
    Bytes {
        bytes: &'a [u8],
        cut: bool,
    },
}

/// Field number 1 of a protobuf message, if present and well formed (in what was read, when
/// only the start of the message was).
pub(super) fn first_field(mut message: &[u8], complete: bool) -> Option<Field<'_>> {
    while !message.is_empty() {
        let key = varint(&mut message)?;
        let (number, wire) = (key >> 3, key & 7);
        let field = match wire {
            0 => Field::Varint(varint(&mut message)?),
            1 => {
                message = message.get(8..)?;
                continue;
            }
            2 => {
                let len = usize::try_from(varint(&mut message)?).ok()?;
                if len > message.len() {
                    if complete {
                        return None;
                    }
                    let bytes = message;
                    message = &[];
                    Field::Bytes { bytes, cut: true }
                } else {
                    let bytes = &message[..len];
                    message = &message[len..];
                    Field::Bytes { bytes, cut: false }
                }
            }
            5 => {
                message = message.get(4..)?;
                continue;
            }
            _ => return None,
        };
        if number == 1 {
            return Some(field);
        }
    }
    None
}

pub(super) fn varint(input: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for (i, byte) in input.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            *input = &input[i + 1..];
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_preview_is_the_first_field() {
        // field 1, string "97"
        assert_eq!(input_preview("IsPrime", &[0x0a, 2, b'9', b'7'], true), "97");
        // field 2 (bool) before field 1 (string): still found
        assert_eq!(
            input_preview("IsPalindrome", &[0x10, 1, 0x0a, 1, b'x'], true),
            "x"
        );
        // field 1, varint 300
        assert_eq!(input_preview("Fibonacci", &[0x08, 0xac, 0x02], true), "300");
        assert_eq!(input_preview("Fibonacci", &[], true), "0");
        assert_eq!(input_preview("Reverse", &[], true), "");
        // malformed: a length past the end of the whole message
        assert_eq!(input_preview("Reverse", &[0x0a, 9, b'a'], true), "");
        // the same, when only the start was read: the start is shown, marked as cut
        assert_eq!(input_preview("Reverse", &[0x0a, 9, b'a'], false), "a…");
    }

    #[test]
    fn a_compressed_request_is_previewed_as_such() {
        // Reverse("97"), uncompressed and with the compressed flag.
        assert_eq!(
            framed_preview("Reverse", &[0, 0, 0, 0, 4, 0x0a, 2, b'9', b'7'], true),
            "97"
        );
        assert_eq!(
            framed_preview("Reverse", &[1, 0, 0, 0, 4, 0x0a, 2, b'9', b'7'], true),
            "(compressed)"
        );
    }

    #[test]
    fn a_long_text_is_cut_with_a_mark() {
        let text = "é".repeat(1000);
        let mut m = vec![0x0a, 0xd0, 0x0f]; // 2000 bytes
        m.extend_from_slice(text.as_bytes());
        for shown in [
            input_preview("Reverse", &m, true),
            // Only the start read, cut inside a character.
            input_preview("Reverse", &m[..PREVIEW_BYTES - FRAME_HEADER - 1], false),
        ] {
            assert!(shown.ends_with('…'), "{shown}");
            assert!(shown.chars().count() <= dlb::events::INPUT_PREVIEW_CHARS + 1);
            assert!(shown.trim_end_matches('…').chars().all(|c| c == 'é'));
        }
    }
}
