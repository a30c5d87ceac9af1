//! Parsing what the guest wrote to its results port: `@@` marker lines from the init script,
//! and between `@@ begin NAME` and `@@ exit NAME RC [SECONDS]` the raw output of a test
//! executable (libtest's `test NAME ... ok|FAILED|ignored` lines) or of an attach check.
use std::collections::BTreeMap;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    Failed(String),
    Ignored,
}

#[derive(Debug, Default)]
pub struct Results {
    pub kernel_release: Option<String>,
    /// "binary::test" or "check:name", in the order reported.
    pub items: Vec<(String, Verdict)>,
    pub modules_failed: Vec<String>,
    /// Raw output per begin/exit section, for failure reports.
    pub sections: BTreeMap<String, String>,
    /// Seconds per test executable.
    pub durations: Vec<(String, u64)>,
    pub done: bool,
}

impl Results {
    pub fn passed(&self) -> usize {
        self.items.iter().filter(|(_, v)| *v == Verdict::Ok).count()
    }

    pub fn failed(&self) -> Vec<&(String, Verdict)> {
        self.items
            .iter()
            .filter(|(_, v)| matches!(v, Verdict::Failed(_)))
            .collect()
    }

    pub fn ignored(&self) -> usize {
        self.items
            .iter()
            .filter(|(_, v)| *v == Verdict::Ignored)
            .count()
    }
}

pub fn parse(text: &str) -> Results {
    let mut r = Results::default();
    let mut section: Option<(String, String)> = None;
    for line in text.lines() {
        if let Some(m) = line.strip_prefix("@@ ") {
            let mut w = m.splitn(2, ' ');
            let (word, rest) = (w.next().unwrap_or(""), w.next().unwrap_or(""));
            match word {
                "kernel" => r.kernel_release = Some(rest.to_string()),
                "module" => {
                    let mut p = rest.splitn(3, ' ');
                    let (name, status, msg) = (
                        p.next().unwrap_or(""),
                        p.next().unwrap_or(""),
                        p.next().unwrap_or(""),
                    );
                    if status != "ok" {
                        r.modules_failed.push(format!("{name}: {msg}"));
                    }
                }
                "check" => {
                    let mut p = rest.splitn(3, ' ');
                    let (name, status, msg) = (
                        p.next().unwrap_or(""),
                        p.next().unwrap_or(""),
                        p.next().unwrap_or(""),
                    );
                    let v = if status == "ok" {
                        Verdict::Ok
                    } else {
                        Verdict::Failed(msg.to_string())
                    };
                    r.items.push((format!("check:{name}"), v));
                }
                "begin" => section = Some((rest.to_string(), String::new())),
                "exit" => {
                    let mut p = rest.split(' ');
                    let name = p.next().unwrap_or("").to_string();
                    let rc: i32 = p.next().and_then(|c| c.parse().ok()).unwrap_or(-1);
                    let secs: Option<u64> = p.next().and_then(|s| s.parse().ok());
                    let out = match section.take() {
                        Some((n, out)) if n == name => out,
                        _ => String::new(),
                    };
                    if !name.starts_with("attach-") {
                        finish_binary(&mut r, &name, rc, &out, secs);
                    }
                    r.sections.insert(name, out);
                }
                "done" => r.done = true,
                _ => {}
            }
            continue;
        }
        if let Some((_, out)) = section.as_mut() {
            out.push_str(line);
            out.push('\n');
        }
    }
    if let Some((name, out)) = section {
        // The VM stopped while this executable ran.
        let last = libtest_verdicts(&out).1.unwrap_or_default();
        r.items.push((
            format!("{name}::<binary>"),
            Verdict::Failed(format!(
                "the VM stopped while it ran (last test started: {last})"
            )),
        ));
        r.sections.insert(name, out);
    }
    r
}

fn finish_binary(r: &mut Results, name: &str, rc: i32, out: &str, secs: Option<u64>) {
    let (verdicts, running) = libtest_verdicts(out);
    let mut any_failed = false;
    let count = verdicts.len();
    for (test, verdict) in verdicts {
        let v = match verdict {
            "ok" => Verdict::Ok,
            "FAILED" => {
                any_failed = true;
                Verdict::Failed(failure_detail(out, test))
            }
            _ => Verdict::Ignored,
        };
        r.items.push((format!("{name}::{test}"), v));
    }
    if let Some(s) = secs {
        r.durations.push((name.to_string(), s));
    }
    if rc != 0 && !any_failed {
        let why = match rc {
            137 => format!("killed at the time limit after {}s", secs.unwrap_or(0)),
            _ => format!("exited with status {rc}"),
        };
        let last = running
            .map(|t| format!(" (last test started: {t})"))
            .unwrap_or_default();
        r.items.push((
            format!("{name}::<binary>"),
            Verdict::Failed(format!("{why}{last}")),
        ));
    } else if rc == 0 && count == 0 && !out.contains("running 0 tests") {
        r.items.push((
            format!("{name}::<binary>"),
            Verdict::Failed("exited 0 but reported no tests".into()),
        ));
    }
}

/// libtest's verdicts (`test NAME ... ok|FAILED|ignored`), and the test that was running when
/// the output ended, if any. Output of programs a test runs can land between "test NAME ... "
/// and its verdict, which then stands on a line of its own.
fn libtest_verdicts(out: &str) -> (Vec<(&str, &str)>, Option<&str>) {
    fn verdict(s: &str) -> Option<&str> {
        let s = s.trim();
        (s == "ok" || s == "FAILED" || s.starts_with("ignored")).then_some(s)
    }
    let mut done = Vec::new();
    let mut pending = None;
    for line in out.lines() {
        if let Some((test, rest)) = line
            .strip_prefix("test ")
            .and_then(|l| l.split_once(" ... "))
        {
            match verdict(rest) {
                Some(v) => {
                    done.push((test, v));
                    pending = None;
                }
                None => pending = Some(test),
            }
        } else if let (Some(test), Some(v)) = (pending, verdict(line)) {
            done.push((test, v));
            pending = None;
        }
    }
    (done, pending)
}

/// The panic message libtest prints for a failed test, first lines only.
fn failure_detail(out: &str, test: &str) -> String {
    let header = format!("---- {test} stdout ----");
    let Some(i) = out.find(&header) else {
        return String::new();
    };
    out[i + header.len()..]
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take_while(|l| !l.starts_with("---- ") && !l.starts_with("failures:"))
        .filter(|l| !l.starts_with("note: run with") && !l.starts_with("stack backtrace"))
        .take(4)
        .map(strip_controls)
        .collect::<Vec<_>>()
        .join(" | ")
}

/// Drops terminal escape sequences and carriage returns (SeaBIOS and the kernel print some).
pub fn strip_controls(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                if chars.peek() == Some(&'[') {
                    chars.next();
                    while let Some(&n) = chars.peek() {
                        chars.next();
                        if n.is_ascii_alphabetic() {
                            break;
                        }
                    }
                } else {
                    chars.next();
                }
            }
            '\r' => {}
            c if c.is_control() && c != '\t' => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tests_checks_and_crashes() {
        let text = "@@ kernel 6.1.0-56-cloud-amd64\n@@ module veth ok\n@@ module sctp FAILED insmod: x\n\
@@ begin attach-auto\nlog\n@@ exit attach-auto 0\n@@ check attach-auto ok chose clsact\n\
@@ begin ebpf_packets\nrunning 3 tests\ntest a ... ok\ntest b ... FAILED\ntest c ... ignored, needs x\n\n\
failures:\n\n---- b stdout ----\n\nthread 'b' panicked at x.rs:1:1:\nboom\nnote: run with `RUST_BACKTRACE=1`\n\n\
failures:\n    b\n\ntest result: FAILED. 1 passed; 1 failed\n@@ exit ebpf_packets 101 12\n\
@@ begin redirect\nrunning 2 tests\ntest x ... ok\ntest y ... \n";
        let r = parse(text);
        assert_eq!(r.kernel_release.as_deref(), Some("6.1.0-56-cloud-amd64"));
        assert_eq!(r.modules_failed, ["sctp: insmod: x"]);
        assert!(!r.done);
        let names: Vec<&str> = r.items.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "check:attach-auto",
                "ebpf_packets::a",
                "ebpf_packets::b",
                "ebpf_packets::c",
                "redirect::<binary>"
            ]
        );
        assert_eq!(r.passed(), 2);
        assert_eq!(r.ignored(), 1);
        let failed = r.failed();
        assert_eq!(failed.len(), 2);
        assert_eq!(
            failed[0].1,
            Verdict::Failed("thread 'b' panicked at x.rs:1:1: | boom".into())
        );
        assert_eq!(
            failed[1].1,
            Verdict::Failed("the VM stopped while it ran (last test started: y)".into())
        );
        assert_eq!(r.durations, [("ebpf_packets".to_string(), 12)]);
    }

    #[test]
    fn a_verdict_after_other_output_counts() {
        let r = parse(
            "@@ begin t\nrunning 2 tests\ntest a ... Actual changes:\nrx: off\nok\ntest b ... ok\n@@ exit t 0 1\n",
        );
        let names: Vec<&str> = r.items.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["t::a", "t::b"]);
        assert_eq!(r.passed(), 2);
    }

    #[test]
    fn a_crashed_binary_is_a_failure() {
        let r = parse(
            "@@ begin t\nrunning 2 tests\ntest a ... ok\ntest b ... \n@@ exit t 139 3\n@@ done\n",
        );
        assert!(r.done);
        assert_eq!(r.failed()[0].0, "t::<binary>");
        assert_eq!(
            r.failed()[0].1,
            Verdict::Failed("exited with status 139 (last test started: b)".into())
        );
    }
}
