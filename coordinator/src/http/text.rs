//! The one check that every text value from the network passes before a handler sees it: JSON
//! bodies (every string and object key, at any depth, training-session control frames included),
//! query strings and path parameters ([`super::extract`]).
//!
//! Refused: control characters (Unicode category Cc, U+0000 included, which Postgres cannot
//! store), format characters (Cf: bidirectional overrides and isolates, zero-width characters,
//! the byte-order mark, tags, …) and the line and paragraph separators. They have no place in
//! names, e-mail addresses, passwords or versions, and they let one name pass for another on
//! screen (`"\u{202e}\u{200b}evil"` shows as "live").

use medsplit_engine::api::FieldError;
use serde_json::Value;

/// Whether `c` is refused in any text from the network.
pub fn refused(c: char) -> bool {
    c.is_control() || is_format(c) || matches!(c, '\u{2028}' | '\u{2029}')
}

/// Unicode general category Cf (format), as of Unicode 16.
fn is_format(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{0600}'..='\u{0605}'
            | '\u{061C}'
            | '\u{06DD}'
            | '\u{070F}'
            | '\u{0890}'..='\u{0891}'
            | '\u{08E2}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{206F}'
            | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}'
            | '\u{110BD}'
            | '\u{110CD}'
            | '\u{13430}'..='\u{1343F}'
            | '\u{1BCA0}'..='\u{1BCA3}'
            | '\u{1D173}'..='\u{1D17A}'
            | '\u{E0001}'
            | '\u{E0020}'..='\u{E007F}'
    )
}

/// Refuses `text` if it holds a refused character; the error names `field` and the character.
pub fn check(field: &str, text: &str) -> Result<(), FieldError> {
    match text.chars().position(refused) {
        None => Ok(()),
        Some(at) => {
            let c = text.chars().nth(at).expect("found");
            Err(FieldError::new(
                field,
                format!(
                    "must not contain control or formatting characters \
                     (U+{:04X} at character {})",
                    c as u32,
                    at + 1
                ),
            ))
        }
    }
}

/// Checks every string and object key in a JSON document. Fields are named as in the API's
/// other errors: `name`, `hospitals[2]`, `server_optimizer.kind`.
pub fn check_json(value: &Value) -> Result<(), FieldError> {
    walk(value, &mut String::new())
}

fn walk(value: &Value, path: &mut String) -> Result<(), FieldError> {
    match value {
        Value::String(s) => check(field(path), s),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                walk(item, path)?;
                path.truncate(len);
            }
            Ok(())
        }
        Value::Object(map) => {
            for (key, item) in map {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(&key.chars().filter(|c| !refused(*c)).collect::<String>());
                check(field(path), key)?;
                walk(item, path)?;
                path.truncate(len);
            }
            Ok(())
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => Ok(()),
    }
}

fn field(path: &str) -> &str {
    if path.is_empty() { "." } else { path }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_controls_bidi_and_invisible_characters() {
        for c in [
            '\0',
            '\t',
            '\n',
            '\u{1b}',
            '\u{7f}',
            '\u{85}',
            '\u{ad}',
            '\u{200b}',
            '\u{200d}',
            '\u{202e}',
            '\u{2066}',
            '\u{2028}',
            '\u{feff}',
            '\u{e0041}',
        ] {
            assert!(refused(c), "U+{:04X}", c as u32);
        }
        for c in ['a', ' ', 'é', 'ß', 'Ω', '中', '😀', '-', '@', '\u{a0}'] {
            assert!(!refused(c), "U+{:04X}", c as u32);
        }
    }

    #[test]
    fn names_the_field_at_any_depth() {
        let v: Value = serde_json::json!({
            "name": "ok",
            "hospitals": ["h0", "h\u{0}1"],
        });
        let e = check_json(&v).unwrap_err();
        assert_eq!(e.field, "hospitals[1]");
        assert!(e.message.contains("U+0000 at character 2"), "{}", e.message);
        let v: Value = serde_json::json!({ "server_optimizer": { "kind": "\u{202e}adam" } });
        assert_eq!(check_json(&v).unwrap_err().field, "server_optimizer.kind");
        let v: Value = serde_json::json!({ "a\u{7}b": 1 });
        assert_eq!(check_json(&v).unwrap_err().field, "ab");
        assert_eq!(
            check_json(&Value::String("\u{1}".into()))
                .unwrap_err()
                .field,
            "."
        );
        assert!(check_json(&serde_json::json!({ "name": "Zürich-Süd 3", "n": [1, null] })).is_ok());
    }
}
