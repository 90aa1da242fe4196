//! Reading one line of the Prometheus text format, as the app's own
//! `prom-client` writes it: the merged `/metrics` checks every line it
//! passes on, and the counters kept for departed workers are read with it.

/// A sample line, read: its name, its labels (values as written, escapes
/// and all) and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample<'a> {
    pub name: &'a str,
    pub labels: Vec<(&'a str, &'a str)>,
    pub value: f64,
}

/// A sample line of the text format, `name{label="value",...} value
/// [timestamp]`, or `None` when it is not one.
pub fn parse_sample(line: &str) -> Option<Sample<'_>> {
    let is_name = |c: char, first: bool| {
        c.is_ascii_alphabetic() || c == '_' || c == ':' || (!first && c.is_ascii_digit())
    };
    let end = line
        .char_indices()
        .find(|&(i, c)| !is_name(c, i == 0))
        .map_or(line.len(), |(i, _)| i);
    if end == 0 {
        return None;
    }
    let (name, mut rest) = line.split_at(end);
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        rest = inner;
        loop {
            rest = rest.trim_start();
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let n = rest
                .char_indices()
                .find(|&(i, c)| !(is_name(c, i == 0) && c != ':'))
                .map_or(rest.len(), |(i, _)| i);
            if n == 0 {
                return None;
            }
            let label = &rest[..n];
            rest = rest[n..].trim_start().strip_prefix('=')?;
            rest = rest.trim_start().strip_prefix('"')?;
            // The value, up to its closing quote; `\` escapes the next byte.
            let mut escaped = false;
            let close = rest.char_indices().find(|&(_, c)| {
                let end = c == '"' && !escaped;
                escaped = c == '\\' && !escaped;
                end
            })?;
            labels.push((label, &rest[..close.0]));
            rest = rest[close.0 + 1..].trim_start();
            if let Some(after) = rest.strip_prefix(',') {
                rest = after;
            } else if !rest.starts_with('}') {
                return None;
            }
        }
    }
    let mut words = rest.split_whitespace();
    if !rest.starts_with([' ', '\t']) {
        return None;
    }
    let value = words.next()?.parse::<f64>().ok()?;
    if let Some(ts) = words.next() {
        ts.parse::<i64>().ok()?;
    }
    if words.next().is_some() {
        return None;
    }
    Some(Sample {
        name,
        labels,
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_read_as_the_text_format_has_them() {
        let read = |l| parse_sample(l).map(|s| (s.name, s.labels, s.value.to_string()));
        assert_eq!(read("up 1"), Some(("up", vec![], "1".into())));
        assert_eq!(
            read(r#"a_b:c{x="1",le="+Inf"} 2.5 1700000000000"#),
            Some(("a_b:c", vec![("x", "1"), ("le", "+Inf")], "2.5".into()))
        );
        assert_eq!(
            read(r#"a{x="q\"}, worker=\"1",} NaN"#),
            Some(("a", vec![("x", r#"q\"}, worker=\"1"#)], "NaN".into()))
        );
        assert_eq!(read("a{} -Inf"), Some(("a", vec![], "-inf".into())));
        for bad in [
            "a",
            "a{x=\"1\"}",
            "a{x=1} 2",
            "a{x=\"1\" 2",
            "a 1 2 3",
            "a one",
            "1a 2",
            "a{worker=\"1\"}2",
        ] {
            assert_eq!(parse_sample(bad), None, "{bad}");
        }
    }
}
