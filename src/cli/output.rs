//! What the commands print: aligned tables, JSON, values; and the terminal prompt.

use super::{bail, IsTerminal, Reading, Result, Serialize, Write};

/// Writes to stdout; a closed pipe (`meterd read … | head`) ends the process quietly.
pub fn out(text: &str) {
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
    }
}

/// An aligned text table: the human output of every read command.
#[must_use]
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            let pad = widths[i].saturating_sub(c.chars().count());
            s.push_str(c);
            if i + 1 < cells.len() {
                s.push_str(&" ".repeat(pad + 2));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut s = line(headers.to_vec());
    s += &line(
        widths
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .iter()
            .map(std::string::String::as_str)
            .collect(),
    );
    for r in rows {
        s += &line(r.iter().map(std::string::String::as_str).collect());
    }
    s
}

/// A JSON value as a table cell: text as it is, `-` for nothing, other values as JSON.
pub(crate) fn cell(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "-".to_string(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A table of JSON objects: one row per object, one column per (header, field); a missing or
/// null field shows as `-`.
pub(crate) fn json_table(items: &[serde_json::Value], columns: &[(&str, &str)]) -> String {
    let headers: Vec<&str> = columns.iter().map(|(h, _)| *h).collect();
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|item| {
            columns
                .iter()
                .map(|(_, field)| cell(&item[*field]))
                .collect()
        })
        .collect();
    table(&headers, &rows)
}

pub(crate) fn json<T: Serialize>(v: &T) -> Result<String> {
    Ok(serde_json::to_string_pretty(v)? + "\n")
}

pub(crate) fn fmt_value(r: &Reading) -> String {
    match r.value {
        None => "-".into(),
        Some(v) if v.fract() == 0.0 && v.abs() < 1e15 => format!("{v:.0}"),
        Some(v) => format!("{v:.3}"),
    }
}

/// Asks on the terminal before a write; refuses on a non-interactive input.
pub(crate) fn confirm(what: &str) -> Result<bool> {
    if !std::io::stdin().is_terminal() {
        bail!(
            "{what}: refusing to write without confirmation on a non-interactive input; pass --yes"
        );
    }
    eprint!("{what}\nProceed? [y/N] ");
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    Ok(matches!(line.trim(), "y" | "Y" | "yes"))
}
