//! `env_file`: variables from files in Node's `--env-file` format, so a
//! team keeps one `.env` for `node --env-file` and for nodeherd.
//!
//! The format, as Node (and dotenv) read it: `KEY=VALUE` lines, an optional
//! `export ` before the key, `#` comments (a whole line, or after an
//! unquoted value), values in single, double or back quotes (which may
//! span lines; in double quotes `\n` is a newline), unquoted values trimmed.
//! Lines without `=` are skipped, as Node skips them.
//!
//! The values are secrets more often than not: no error here ever quotes a
//! line, only its number.

/// The variables of one file, in order (a later line wins).
pub fn parse(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let number = i + 1;
        let line = lines[i].trim_start();
        i += 1;
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((key, rest)) = line.split_once('=') else {
            continue;
        };
        let key = key.trim();
        if key.is_empty()
            || !key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        {
            return Err(format!(
                "line {number}: the name before `=` must be letters, digits, `_`, `.` or `-`"
            ));
        }
        let rest = rest.trim_start();
        let value = match rest.chars().next() {
            Some(q @ ('"' | '\'' | '`')) => {
                // A quoted value ends at its closing quote, maybe lines later.
                let mut body = rest[1..].to_string();
                loop {
                    if let Some(end) = body.find(q) {
                        body.truncate(end);
                        break;
                    }
                    let Some(next) = lines.get(i) else {
                        return Err(format!(
                            "line {number}: the value's opening {q} is never closed"
                        ));
                    };
                    body.push('\n');
                    body.push_str(next);
                    i += 1;
                }
                if q == '"' {
                    body.replace("\\n", "\n")
                } else {
                    body
                }
            }
            _ => rest.split('#').next().unwrap_or("").trim().to_string(),
        };
        if value.contains('\0') {
            return Err(format!("line {number}: the value holds a NUL byte"));
        }
        out.push((key.to_string(), value));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_node_reads() {
        let text = "# a comment\n\
                    PLAIN=value\n\
                    SPACED =  padded value   \n\
                    export EXPORTED=yes\n\
                    INLINE=kept # dropped\n\
                    EMPTY=\n\
                    SINGLE='a # b'\n\
                    DOUBLE=\"one\\ntwo\"\n\
                    MULTI=\"first\nsecond\"\n\
                    no equals sign here\n\
                    PLAIN=later wins\n";
        let vars = parse(text).unwrap();
        let get = |k: &str| {
            vars.iter()
                .rev()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("PLAIN"), Some("later wins"));
        assert_eq!(get("SPACED"), Some("padded value"));
        assert_eq!(get("EXPORTED"), Some("yes"));
        assert_eq!(get("INLINE"), Some("kept"));
        assert_eq!(get("EMPTY"), Some(""));
        assert_eq!(get("SINGLE"), Some("a # b"));
        assert_eq!(get("DOUBLE"), Some("one\ntwo"));
        assert_eq!(get("MULTI"), Some("first\nsecond"));
    }

    #[test]
    fn errors_name_the_line_and_never_quote_it() {
        let e = parse("OK=1\nBAD KEY=hunter2\n").unwrap_err();
        assert!(e.starts_with("line 2:"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
        let e = parse("A=\"hunter2\n").unwrap_err();
        assert!(e.starts_with("line 1:") && !e.contains("hunter2"), "{e}");
    }
}
