//! The Prometheus text exposition format, as every component writes it.

use std::borrow::Cow;

/// A label value as the text format wants it between its double quotes: backslash, double quote
/// and line feed escaped (`\\`, `\"`, `\n`); anything else as it is. Names that come from the
/// network (xDS cluster names, peer ids) go through here, so that no value can end a label early
/// or start a line of its own.
pub fn label_value(v: &str) -> Cow<'_, str> {
    if !v.contains(['\\', '"', '\n']) {
        return Cow::Borrowed(v);
    }
    let mut out = String::with_capacity(v.len() + 8);
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped_as_the_text_format_says() {
        assert!(matches!(label_value("east"), Cow::Borrowed("east")));
        assert_eq!(label_value(r#"a"b"#), r#"a\"b"#);
        assert_eq!(label_value(r"a\b"), r"a\\b");
        assert_eq!(label_value("a\nb"), r"a\nb");
        assert_eq!(
            label_value("x\"} 1\nstrait_fake 2"),
            r#"x\"} 1\nstrait_fake 2"#
        );
    }
}
