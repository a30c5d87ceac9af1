//! Samples per figure and contender, medians with min and max, ratios, targets, and the
//! Markdown table (printed, and written into BENCHMARKS.md between markers).
use std::{fmt::Write as _, path::Path};

use anyhow::{Context as _, Result};

/// Who a sample belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Who {
    /// egress-router.
    Ours = 0,
    /// What OpenShift runs: nftables NAT, squid, HAProxy.
    Base = 1,
    /// Plain routing without NAT (redirect mode only).
    Ceiling = 2,
}

impl Who {
    pub fn label(self, section: Section) -> &'static str {
        match (self, section) {
            (Who::Ours, _) => "egress-router",
            (Who::Base, Section::Redirect) => "nftables",
            (Who::Base, Section::Http) => "squid",
            (Who::Base, Section::Dns) => "HAProxy",
            (Who::Ceiling, _) => "plain routing",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Section {
    Redirect,
    Http,
    Dns,
}

impl Section {
    pub fn name(self) -> &'static str {
        match self {
            Section::Redirect => "redirect",
            Section::Http => "HTTP proxy",
            Section::Dns => "DNS proxy",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Better {
    Higher,
    Lower,
    /// Informational (e.g. the generator's offered load): no direction.
    Neither,
}

pub struct Row {
    pub section: Section,
    pub name: String,
    pub better: Better,
    pub values: [Vec<f64>; 3],
}

/// `ours / against` must be at least (or at most) `ratio`.
pub struct Target {
    pub section: Section,
    pub name: &'static str,
    pub against: Who,
    pub at_least: bool,
    pub ratio: f64,
}

#[derive(Default)]
pub struct Report {
    pub rows: Vec<Row>,
    pub targets: Vec<Target>,
    pub errors: Vec<String>,
}

pub fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

/// `min–max` of `v`, as [`num`] writes each.
pub fn range(v: &[f64]) -> String {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{}–{}", num(lo), num(hi))
}

/// Three significant digits with k/M suffixes.
pub fn num(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

impl Report {
    pub fn record(&mut self, section: Section, name: &str, better: Better, who: Who, v: f64) {
        let i = match self
            .rows
            .iter()
            .position(|r| r.section == section && r.name == name)
        {
            Some(i) => i,
            None => {
                self.rows.push(Row {
                    section,
                    name: name.to_string(),
                    better,
                    values: Default::default(),
                });
                self.rows.len() - 1
            }
        };
        self.rows[i].values[who as usize].push(v);
    }

    pub fn target(
        &mut self,
        section: Section,
        name: &'static str,
        against: Who,
        at_least: bool,
        ratio: f64,
    ) {
        self.targets.push(Target {
            section,
            name,
            against,
            at_least,
            ratio,
        });
    }

    fn row(&self, section: Section, name: &str) -> Option<&Row> {
        self.rows
            .iter()
            .find(|r| r.section == section && r.name == name)
    }

    /// median(ours) / median(against).
    pub fn ratio(&self, row: &Row, against: Who) -> Option<f64> {
        let (o, a) = (
            median(&row.values[Who::Ours as usize])?,
            median(&row.values[against as usize])?,
        );
        (a != 0.0).then(|| o / a)
    }

    /// None when a side has no sample.
    pub fn met(&self, t: &Target) -> Option<(f64, bool)> {
        let r = self.ratio(self.row(t.section, t.name)?, t.against)?;
        Some((
            r,
            if t.at_least {
                r >= t.ratio
            } else {
                r <= t.ratio
            },
        ))
    }

    fn target_text(&self, t: &Target) -> String {
        let cmp = if t.at_least { "≥" } else { "≤" };
        let verdict = match self.met(t) {
            Some((_, true)) => "**met**",
            Some((_, false)) => "**missed**",
            None => "no data",
        };
        format!(
            "{cmp} {}× {}: {verdict}",
            t.ratio,
            t.against.label(t.section)
        )
    }

    fn cell(v: &[f64]) -> String {
        match median(v) {
            None => "–".into(),
            Some(m) if v.len() == 1 => num(m),
            Some(m) => format!("{} ({})", num(m), range(v)),
        }
    }

    /// The results table: median (min–max) over rounds, and ratios of medians.
    pub fn table(&self) -> String {
        let mut s = String::new();
        s.push_str(
            "| mode | figure | egress-router | baseline | ceiling | ours ÷ baseline | ours ÷ ceiling | target |\n\
             |---|---|---|---|---|---|---|---|\n",
        );
        for r in &self.rows {
            let ratio = |w: Who| {
                self.ratio(r, w)
                    .map(|x| format!("{x:.2}×"))
                    .unwrap_or_else(|| "–".into())
            };
            let targets: Vec<String> = self
                .targets
                .iter()
                .filter(|t| t.section == r.section && t.name == r.name)
                .map(|t| self.target_text(t))
                .collect();
            let base = if r.values[1].is_empty() {
                "–".to_string()
            } else {
                format!(
                    "{}: {}",
                    Who::Base.label(r.section),
                    Self::cell(&r.values[1])
                )
            };
            let _ = writeln!(
                s,
                "| {} | {}{} | {} | {} | {} | {} | {} | {} |",
                r.section.name(),
                r.name,
                match r.better {
                    Better::Higher => " ↑",
                    Better::Lower => " ↓",
                    Better::Neither => "",
                },
                Self::cell(&r.values[0]),
                base,
                Self::cell(&r.values[2]),
                ratio(Who::Base),
                ratio(Who::Ceiling),
                targets.join("; ")
            );
        }
        s
    }

    /// One line per target: met, missed, or no data.
    pub fn target_summary(&self) -> String {
        let mut s = String::new();
        for t in &self.targets {
            let r = self
                .met(t)
                .map(|(r, _)| format!(" (measured {r:.2}×)"))
                .unwrap_or_default();
            let _ = writeln!(
                s,
                "- {} {}: {}{r}",
                t.section.name(),
                t.name,
                self.target_text(t)
            );
        }
        s
    }
}

pub const BEGIN: &str =
    "<!-- bench:begin (generated by `cargo xtask bench`; edit outside these markers) -->";
pub const END: &str = "<!-- bench:end -->";

/// Replaces the generated part of BENCHMARKS.md (between the markers), keeping the rest; a
/// missing file or missing markers get a fresh skeleton.
pub fn write_benchmarks_md(path: &Path, generated: &str) -> Result<()> {
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let new = match (old.find(BEGIN), old.find(END)) {
        (Some(b), Some(e)) if b < e => {
            format!("{}{BEGIN}\n{generated}{}", &old[..b], &old[e..])
        }
        _ => format!(
            "# Benchmarks\n\n{BEGIN}\n{generated}{END}\n\n## What limits each figure\n\n(analysis goes here)\n"
        ),
    };
    std::fs::write(path, new).with_context(|| format!("writing {}", path.display()))
}
