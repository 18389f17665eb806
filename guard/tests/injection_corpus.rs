//! Detection and false-positive rates of the built-in injection rules on a hand-written,
//! multilingual corpus (`tests/corpus/*.jsonl`). Each case goes through the pipeline's order:
//! `unicode::clean`, then `Rules::scan`. Run with `--nocapture` to see the rates per language
//! and category.

use std::collections::BTreeMap;

use serde::Deserialize;
use sluice_guard::injection::{DEFAULT_THRESHOLD, InjectionReport, Rules};
use sluice_guard::unicode;

const MIN_CASES: usize = 300;
const MIN_DETECTION: f64 = 0.90;
const MAX_FALSE_POSITIVES: f64 = 0.03;

#[derive(Debug, Deserialize)]
struct Case {
    text: String,
    lang: String,
    #[serde(default)]
    category: Option<String>,
    /// Written after the rules were tuned and never tuned against: a check of how the rules
    /// generalise. Counted in the totals like every other case, and also reported apart.
    #[serde(default)]
    holdout: bool,
}

fn load(name: &str) -> Vec<Case> {
    let path = format!("{}/tests/corpus/{name}", env!("CARGO_MANIFEST_DIR"));
    let source = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    source
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(n, line)| {
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{path}:{}: {e}", n + 1))
        })
        .collect()
}

fn scan(rules: &Rules, text: &str) -> InjectionReport {
    rules.scan(&unicode::clean(text).text)
}

fn fires(report: &InjectionReport) -> bool {
    !report.categories_over(DEFAULT_THRESHOLD).is_empty()
}

/// (hits, total) per key.
#[derive(Default)]
struct Tally(BTreeMap<String, (usize, usize)>);

impl Tally {
    fn add(&mut self, key: &str, hit: bool) {
        let entry = self.0.entry(key.to_owned()).or_default();
        entry.0 += usize::from(hit);
        entry.1 += 1;
    }

    fn print(&self, title: &str) {
        println!("{title}:");
        for (key, (hits, total)) in &self.0 {
            println!(
                "  {key:<22} {hits:>4}/{total:<4} {:.3}",
                rate(*hits, *total)
            );
        }
    }
}

fn rate(hits: usize, total: usize) -> f64 {
    if total == 0 {
        0.0
    } else {
        hits as f64 / total as f64
    }
}

#[test]
fn corpus_detection_and_false_positive_rates() {
    let rules = Rules::builtin();
    let attacks = load("attacks.jsonl");
    let benign = load("benign.jsonl");
    assert!(
        attacks.len() >= MIN_CASES,
        "only {} attack cases",
        attacks.len()
    );
    assert!(
        benign.len() >= MIN_CASES,
        "only {} benign cases",
        benign.len()
    );

    let (mut by_lang, mut by_category) = (Tally::default(), Tally::default());
    let mut holdout = Tally::default();
    let mut detected = 0;
    for case in &attacks {
        let category = case.category.as_deref().unwrap_or("?");
        let report = scan(&rules, &case.text);
        let hit = fires(&report);
        detected += usize::from(hit);
        by_lang.add(&case.lang, hit);
        by_category.add(category, hit);
        if case.holdout {
            holdout.add("attacks detected", hit);
        }
        if !hit {
            let tag = if case.holdout { " holdout" } else { "" };
            println!(
                "MISSED{tag} [{}/{category}] {:?} -> {:?}",
                case.lang, case.text, report.scores
            );
        }
    }

    let mut fp_by_lang = Tally::default();
    let mut false_positives = 0;
    for case in &benign {
        let report = scan(&rules, &case.text);
        let hit = fires(&report);
        false_positives += usize::from(hit);
        fp_by_lang.add(&case.lang, hit);
        if case.holdout {
            holdout.add("benign flagged", hit);
        }
        if hit {
            let tag = if case.holdout { " holdout" } else { "" };
            println!(
                "FALSE POSITIVE{tag} [{}] {:?} -> {:?} {:?}",
                case.lang, case.text, report.scores, report.matched_rules
            );
        }
    }

    let detection = rate(detected, attacks.len());
    let fp_rate = rate(false_positives, benign.len());
    println!(
        "detection {detected}/{} = {detection:.3}; false positives {false_positives}/{} = {fp_rate:.3}",
        attacks.len(),
        benign.len()
    );
    by_lang.print("detection per language");
    by_category.print("detection per category");
    fp_by_lang.print("false positives per language");
    holdout.print("holdout cases (written after tuning)");

    assert!(
        detection >= MIN_DETECTION,
        "detection rate {detection:.3} < {MIN_DETECTION}"
    );
    assert!(
        fp_rate <= MAX_FALSE_POSITIVES,
        "false-positive rate {fp_rate:.3} > {MAX_FALSE_POSITIVES}"
    );
}

#[test]
fn corpus_covers_every_category_and_language() {
    let attacks = load("attacks.jsonl");
    for category in [
        "instruction_override",
        "role_hijack",
        "prompt_extraction",
        "delimiter_forgery",
        "encoded_payload",
    ] {
        assert!(
            attacks
                .iter()
                .filter(|c| c.category.as_deref() == Some(category))
                .count()
                >= 20,
            "{category}"
        );
    }
    let benign = load("benign.jsonl");
    for lang in ["en", "zh", "es", "fr", "de", "ja"] {
        assert!(
            attacks.iter().filter(|c| c.lang == lang).count() >= 30,
            "attacks {lang}"
        );
        assert!(
            benign.iter().filter(|c| c.lang == lang).count() >= 30,
            "benign {lang}"
        );
    }
}
