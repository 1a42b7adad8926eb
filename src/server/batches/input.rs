//! A batch's input file: JSONL request lines, read in order and validated one by one.

use std::collections::HashSet;
use std::io::BufRead;

use serde_json::Value;

use super::{Endpoint, LineError};
use crate::server::validate::json_kind;

/// A request line of the input file, as validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    /// 1-based.
    pub number: u64,
    pub custom_id: String,
    pub body: Value,
}

/// At most this many validation errors are reported (the first ones).
const MAX_REPORTED_ERRORS: usize = 100;
/// The longest `custom_id` (OpenAI's bound is not documented; this keeps output lines sane).
const MAX_CUSTOM_ID_CHARS: usize = 512;

/// Reads the input file's lines in order, validating each (JSON, a unique non-empty
/// `custom_id`, `method` POST, `url` the batch's endpoint, a `body` object); blank lines are
/// skipped. `each` gets every valid line; a false return stops the reading early. The number
/// of requests, or the errors (at most `MAX_REPORTED_ERRORS`) with their lines.
pub fn read_lines(
    input: impl BufRead,
    endpoint: Endpoint,
    max_requests: usize,
    mut each: impl FnMut(Line) -> bool,
) -> Result<u64, Vec<LineError>> {
    let mut errors = Vec::new();
    let mut seen = HashSet::new();
    let mut count = 0u64;
    let err = |code: &str, line, param: Option<&str>, message: String| LineError {
        code: code.into(),
        message,
        param: param.map(str::to_string),
        line: Some(line),
    };
    for (i, text) in input.lines().enumerate() {
        let number = i as u64 + 1;
        let text = match text {
            Ok(t) => t,
            Err(e) => {
                errors.push(err(
                    "invalid_file",
                    number,
                    None,
                    format!("the file cannot be read as UTF-8 text: {e}"),
                ));
                break;
            }
        };
        if text.trim().is_empty() {
            continue;
        }
        count += 1;
        if count > max_requests as u64 {
            errors.push(err(
                "too_many_requests",
                number,
                None,
                format!("a batch holds at most {max_requests} requests"),
            ));
            break;
        }
        match check_line(&text, number, endpoint, &mut seen) {
            Ok(line) => {
                if errors.is_empty() && !each(line) {
                    return Ok(count);
                }
            }
            Err(e) => {
                errors.push(e);
                if errors.len() >= MAX_REPORTED_ERRORS {
                    break;
                }
            }
        }
    }
    if errors.is_empty() && count == 0 {
        errors.push(LineError {
            code: "empty_file".into(),
            message: "the input file has no requests".into(),
            param: None,
            line: None,
        });
    }
    if errors.is_empty() {
        Ok(count)
    } else {
        Err(errors)
    }
}

fn check_line(
    text: &str,
    number: u64,
    endpoint: Endpoint,
    seen: &mut HashSet<String>,
) -> Result<Line, LineError> {
    let err = |code: &str, param: Option<&str>, message: String| LineError {
        code: code.into(),
        message,
        param: param.map(str::to_string),
        line: Some(number),
    };
    let value: Value = serde_json::from_str(text).map_err(|e| {
        err(
            "invalid_json_line",
            None,
            format!("This line is not parseable as valid JSON: {e}"),
        )
    })?;
    let Value::Object(mut fields) = value else {
        return Err(err(
            "invalid_json_line",
            None,
            format!(
                "a request line must be a JSON object, got {}",
                json_kind(&value)
            ),
        ));
    };
    let custom_id = match fields.remove("custom_id") {
        Some(Value::String(s)) if !s.is_empty() && s.chars().count() <= MAX_CUSTOM_ID_CHARS => s,
        _ => {
            return Err(err(
                "invalid_custom_id",
                Some("custom_id"),
                format!("custom_id must be a string of 1 to {MAX_CUSTOM_ID_CHARS} characters"),
            ))
        }
    };
    if !seen.insert(custom_id.clone()) {
        return Err(err(
            "duplicate_custom_id",
            Some("custom_id"),
            format!("custom_id {custom_id:?} is used by an earlier line; each must be unique"),
        ));
    }
    match fields.remove("method") {
        Some(Value::String(m)) if m == "POST" => {}
        _ => {
            return Err(err(
                "invalid_method",
                Some("method"),
                "method must be POST".into(),
            ))
        }
    }
    match fields.remove("url") {
        Some(Value::String(u)) if u == endpoint.as_str() => {}
        other => {
            return Err(err(
                "mismatched_endpoint",
                Some("url"),
                format!(
                    "url must be the batch's endpoint {}, got {}",
                    endpoint.as_str(),
                    other.map_or("none".into(), |u| u.to_string())
                ),
            ))
        }
    }
    let body = match fields.remove("body") {
        Some(body @ Value::Object(_)) => body,
        _ => {
            return Err(err(
                "invalid_body",
                Some("body"),
                "body must be the request's JSON object".into(),
            ))
        }
    };
    if let Some(k) = fields.keys().next() {
        let shown: String = k.chars().take(64).collect();
        return Err(err(
            "unknown_parameter",
            Some(&shown),
            format!("unknown field {shown:?} (a line has custom_id, method, url and body)"),
        ));
    }
    Ok(Line {
        number,
        custom_id,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str, max: usize) -> Result<Vec<Line>, Vec<LineError>> {
        let mut out = Vec::new();
        read_lines(text.as_bytes(), Endpoint::Generations, max, |l| {
            out.push(l);
            true
        })?;
        Ok(out)
    }

    fn line(id: &str, url: &str) -> String {
        serde_json::json!({"custom_id": id, "method": "POST", "url": url, "body": {"prompt": id}})
            .to_string()
    }

    #[test]
    fn valid_lines_are_read_in_order_and_blank_lines_skipped() {
        let g = "/v1/images/generations";
        let text = format!("{}\n\n{}\n", line("a", g), line("b", g));
        let got = lines(&text, 10).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].number, got[0].custom_id.as_str()), (1, "a"));
        assert_eq!((got[1].number, got[1].custom_id.as_str()), (3, "b"));
        assert_eq!(got[1].body, serde_json::json!({"prompt": "b"}));
    }

    #[test]
    fn every_invalid_line_is_reported_with_its_number() {
        let g = "/v1/images/generations";
        let text = [
            line("a", g),
            "{not json".to_string(),
            line("a", g),
            line("c", "/v1/images/edits"),
            r#"{"custom_id": "d", "method": "GET", "url": "/v1/images/generations", "body": {}}"#
                .into(),
            r#"{"custom_id": "e", "method": "POST", "url": "/v1/images/generations"}"#.into(),
            r#"{"custom_id": "", "method": "POST", "url": "/v1/images/generations", "body": {}}"#
                .into(),
            "[1]".into(),
        ]
        .join("\n");
        let errors = lines(&text, 100).unwrap_err();
        let got: Vec<(&str, Option<u64>)> =
            errors.iter().map(|e| (e.code.as_str(), e.line)).collect();
        assert_eq!(
            got,
            [
                ("invalid_json_line", Some(2)),
                ("duplicate_custom_id", Some(3)),
                ("mismatched_endpoint", Some(4)),
                ("invalid_method", Some(5)),
                ("invalid_body", Some(6)),
                ("invalid_custom_id", Some(7)),
                ("invalid_json_line", Some(8)),
            ]
        );
    }

    #[test]
    fn empty_and_oversized_inputs_fail() {
        assert_eq!(lines("\n  \n", 10).unwrap_err()[0].code, "empty_file");
        let g = "/v1/images/generations";
        let text = [line("a", g), line("b", g), line("c", g)].join("\n");
        let errors = lines(&text, 2).unwrap_err();
        assert_eq!(
            (errors[0].code.as_str(), errors[0].line),
            ("too_many_requests", Some(3))
        );
        assert!(lines(&text, 3).is_ok());
    }
}
