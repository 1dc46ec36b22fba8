//! PgBouncer's `auth_file` (userlist.txt): one `"user" "password"` pair per
//! line, `""` inside quotes stands for one `"`; other lines are ignored.

use super::ConfigError;
use std::path::Path;

pub fn load(path: &Path) -> Result<Vec<(String, String)>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        file: path.display().to_string(),
        source,
    })?;
    parse(&text).map_err(|(line, message)| ConfigError::Invalid {
        file: path.display().to_string(),
        key: "auth_file".into(),
        line: Some(line),
        message,
    })
}

/// Parses userlist text; errors carry the 1-based line.
pub fn parse(text: &str) -> Result<Vec<(String, String)>, (usize, String)> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim_start();
        if t.is_empty() || t.starts_with(';') || t.starts_with('#') {
            continue;
        }
        let (user, rest) = quoted(t).ok_or((i + 1, "expected \"user\" \"password\"".into()))?;
        let (password, _) =
            quoted(rest.trim_start()).ok_or((i + 1, "expected a quoted password".into()))?;
        out.push((user, password));
    }
    Ok(out)
}

fn quoted(s: &str) -> Option<(String, &str)> {
    let mut chars = s.strip_prefix('"')?.char_indices().peekable();
    let mut value = String::new();
    let body = &s[1..];
    while let Some((i, c)) = chars.next() {
        if c == '"' {
            if matches!(chars.peek(), Some((_, '"'))) {
                chars.next();
                value.push('"');
            } else {
                return Some((value, &body[i + 1..]));
            }
        } else {
            value.push(c);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pgbouncer_userlist() {
        let got =
            parse("\"app\" \"secret\"\n; comment\n\"we\"\"ird\" \"md5abc\" extra\n\n\"x\" \"\"\n")
                .unwrap();
        assert_eq!(
            got,
            vec![
                ("app".into(), "secret".into()),
                ("we\"ird".into(), "md5abc".into()),
                ("x".into(), "".into())
            ]
        );
        assert_eq!(parse("app secret").unwrap_err().0, 1);
    }
}
