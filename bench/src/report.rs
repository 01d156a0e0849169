//! The results table: one row per figure, smtpguard's beside its baselines
//! from the same run, with the ratio to each. A figure that could not be
//! measured (a peer that would not start, ...) stays in the table with the
//! reason, never silently left out.

use std::fmt::Write as _;

use super::stats::Sample;

/// One measured value: the number ratios are taken of, and how it reads.
#[derive(Clone, Debug)]
pub struct Figure {
    /// The value ratios are computed from (its unit is in `shown`).
    pub value: f64,
    /// The value as printed, with unit and spread.
    pub shown: String,
}

impl Figure {
    /// A figure printed as `shown`.
    pub fn new(value: f64, shown: impl Into<String>) -> Figure {
        Figure {
            value,
            shown: shown.into(),
        }
    }

    /// A figure from a sample: `median unit (min–max)`.
    pub fn sample(s: &Sample, unit: &str, decimals: usize) -> Figure {
        Figure::new(s.median, s.show(unit, decimals))
    }

    /// A per-second figure from a sample of rates: `1.23 Mconn/s (1.1 M–1.3 M)`.
    pub fn rate(s: &Sample, unit: &str) -> Figure {
        let spread = if s.min == s.max {
            String::new()
        } else {
            format!(" ({}–{})", si(s.min).trim(), si(s.max).trim())
        };
        Figure::new(s.median, format!("{}{unit}/s{spread}", si(s.median)))
    }

    /// The same figure with `note` appended in parentheses.
    pub fn note(mut self, note: impl AsRef<str>) -> Figure {
        write!(self.shown, " ({})", note.as_ref()).unwrap();
        self
    }
}

/// A figure, or why there is none.
pub type Measured = Result<Figure, String>;

/// One row: what was measured, smtpguard's figure, the baselines measured
/// the same way in the same run, and the goal (or `report`).
#[derive(Clone, Debug)]
pub struct Row {
    /// What the row measures, with its unit.
    pub what: String,
    /// smtpguard's figure.
    pub ours: Measured,
    /// `(name, figure)` of each baseline, in the order they are printed.
    pub baselines: Vec<(String, Measured)>,
    /// The goal, or `report` when the figure is only reported.
    pub goal: String,
}

impl Row {
    /// A row with one baseline per `(name, figure)`.
    pub fn new(
        what: impl Into<String>,
        ours: Measured,
        baselines: Vec<(String, Measured)>,
        goal: impl Into<String>,
    ) -> Row {
        Row {
            what: what.into(),
            ours,
            baselines,
            goal: goal.into(),
        }
    }

    /// The ratio cell: `ours / baseline` for each baseline, same order.
    fn ratios(&self) -> String {
        if self.baselines.is_empty() {
            return "—".into();
        }
        self.baselines
            .iter()
            .map(|(_, base)| match (&self.ours, base) {
                (Ok(o), Ok(b)) if b.value != 0.0 && o.value.is_finite() => {
                    let r = o.value / b.value;
                    if r < 0.1 {
                        format!("{r:.4}×")
                    } else {
                        format!("{r:.2}×")
                    }
                }
                _ => "—".into(),
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn cells(&self) -> [String; 5] {
        let shown = |m: &Measured| match m {
            Ok(f) => f.shown.clone(),
            Err(why) => format!("not measured: {why}"),
        };
        let baseline = if self.baselines.is_empty() {
            "—".into()
        } else {
            self.baselines
                .iter()
                .map(|(name, m)| format!("{name}: {}", shown(m)))
                .collect::<Vec<_>>()
                .join("; ")
        };
        [
            self.what.clone(),
            shown(&self.ours),
            baseline,
            self.ratios(),
            self.goal.clone(),
        ]
    }
}

/// The whole table, in sections.
#[derive(Default)]
pub struct Report {
    lines: Vec<Line>,
}

enum Line {
    Section(String),
    Row(Row),
}

impl Report {
    /// Starts a section (a bold row spanning the table).
    pub fn section(&mut self, title: &str) {
        eprintln!("bench: {title}");
        self.lines.push(Line::Section(title.into()));
    }

    /// Adds rows to the current section, echoing each to stderr as it comes.
    pub fn extend(&mut self, rows: impl IntoIterator<Item = Row>) {
        for row in rows {
            eprintln!("  {}", row.cells().join(" | "));
            self.lines.push(Line::Row(row));
        }
    }

    /// The table as markdown.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        writeln!(out, "| what | smtpguard | baseline | ratio | goal |").unwrap();
        writeln!(out, "|---|---|---|---|---|").unwrap();
        for line in &self.lines {
            match line {
                Line::Section(title) => writeln!(out, "| **{title}** | | | | |").unwrap(),
                Line::Row(row) => {
                    let cells = row.cells().map(|c| c.replace('|', "\\|"));
                    writeln!(out, "| {} |", cells.join(" | ")).unwrap()
                }
            }
        }
        out
    }
}

/// `1234567.0` as `1.23 M`, `12345.0` as `12.3 k`: rates for humans.
pub fn si(value: f64) -> String {
    if value >= 1e6 {
        format!("{:.2} M", value / 1e6)
    } else if value >= 1e4 {
        format!("{:.1} k", value / 1e3)
    } else if value >= 100.0 {
        format!("{value:.0} ")
    } else {
        format!("{value:.1} ")
    }
}

/// A byte count as KiB or MiB.
pub fn bytes(value: f64) -> String {
    if value >= 10.0 * 1024.0 * 1024.0 {
        format!("{:.1} MiB", value / (1024.0 * 1024.0))
    } else {
        format!("{:.1} KiB", value / 1024.0)
    }
}

/// `1000000` as `1,000,000`.
pub fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratio_per_baseline_and_missing_peers() {
        let row = Row::new(
            "x",
            Ok(Figure::new(30.0, "30 ns")),
            vec![
                ("a".into(), Ok(Figure::new(20.0, "20 ns"))),
                ("b".into(), Err("no peer".into())),
            ],
            "report",
        );
        let cells = row.cells();
        assert_eq!(cells[2], "a: 20 ns; b: not measured: no peer");
        assert_eq!(cells[3], "1.50×; —");
        assert_eq!(thousands(1_000_000), "1,000,000");
        assert_eq!(thousands(130_320), "130,320");
    }
}
