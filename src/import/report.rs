//! What an import prints: a summary table (and, for a dry run, every row), or JSON.

use super::apply::{Action, Report};

const KINDS: [&str; 11] = [
    "operator",
    "system account",
    "account",
    "key",
    "revocation",
    "role",
    "user",
    "token",
    "export",
    "grant",
    "import",
];

fn counts(report: &Report, kind: &str) -> (usize, usize, usize) {
    let rows = report.changes.iter().filter(|c| c.kind == kind);
    rows.fold((0, 0, 0), |(n, c, k), r| match r.action {
        Action::Create => (n + 1, c, k),
        Action::Change(_) => (n, c + 1, k),
        Action::Keep => (n, c, k + 1),
    })
}

fn headline(report: &Report) -> String {
    let changed = !report.unchanged();
    match (report.dry_run, changed) {
        (true, true) => "dry run: nothing was changed; a real run would do the following".into(),
        (true, false) => "dry run: nothing was changed; a real run would change nothing either (the database already matches the source)".into(),
        (false, true) => "imported in one transaction".into(),
        (false, false) => "nothing to do: the database already matches the source; nothing was changed".into(),
    }
}

/// Plain text: the headline, for a dry run each row, the summary table, the notes.
pub fn table(report: &Report) -> String {
    let mut out = format!("{} ({})\n", headline(report), report.source);
    if report.dry_run {
        for c in &report.changes {
            let what = match &c.action {
                Action::Create => "create".to_string(),
                Action::Change(cols) => format!("change ({})", cols.join(", ")),
                Action::Keep => "leave alone (unchanged)".to_string(),
            };
            out += &format!("  {what:<24} {} {}\n", c.kind, c.name);
        }
    }
    let (new, changed, kept) = if report.dry_run {
        ("would create", "would change", "unchanged")
    } else {
        ("created", "changed", "unchanged")
    };
    out += &format!("\n{:<16} {new:>12} {changed:>12} {kept:>10}\n", "");
    for kind in KINDS {
        let (n, c, k) = counts(report, kind);
        if n + c + k > 0 {
            out += &format!("{:<16} {n:>12} {c:>12} {k:>10}\n", format!("{kind}s"));
        }
    }
    for note in &report.notes {
        out += &format!("note: {note}\n");
    }
    out
}

pub fn json(report: &Report) -> String {
    let rows: Vec<serde_json::Value> = report
        .changes
        .iter()
        .map(|c| {
            let (action, columns) = match &c.action {
                Action::Create => ("create", vec![]),
                Action::Change(cols) => ("change", cols.clone()),
                Action::Keep => ("unchanged", vec![]),
            };
            serde_json::json!({"kind": c.kind, "name": c.name, "action": action, "columns": columns})
        })
        .collect();
    let summary: serde_json::Map<String, serde_json::Value> = KINDS
        .iter()
        .map(|kind| {
            let (n, c, k) = counts(report, kind);
            (
                format!("{kind}s"),
                serde_json::json!({"create": n, "change": c, "unchanged": k}),
            )
        })
        .collect();
    let doc = serde_json::json!({
        "source": report.source,
        "dry_run": report.dry_run,
        "committed": report.committed,
        "unchanged": report.unchanged(),
        "summary": summary,
        "rows": rows,
        "notes": report.notes,
    });
    format!("{doc:#}\n")
}
