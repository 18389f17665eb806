//! The learned classifier's cost per message on this machine's CPU: one text of about 64 and
//! 512 tokens, and 8 texts of 64 tokens scored together (what the API's batching does with
//! concurrent requests). Needs the encoder: `SLUICE_GUARD_MODEL=$(scripts/fetch-guard-model)`.
//! With `SLUICE_GUARD_PROBE_MODEL=$(scripts/fetch-test-model)` the same texts are scored with
//! the served model's probe added too (`with_probe/…`).

use std::path::PathBuf;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use sluice_guard::classifier::Classifier;

/// Ordinary English prose, cut to `tokens` encoder tokens.
fn text_of(classifier: &Classifier, tokens: usize) -> String {
    let sentence = "The committee reviewed the budget for the new library and asked the architects \
                    to reduce the cost of the glass facade before the next meeting. ";
    let mut words: Vec<&str> = Vec::new();
    let all: Vec<&str> = sentence.split_whitespace().collect();
    loop {
        words.push(all[words.len() % all.len()]);
        let text = words.join(" ");
        let n = classifier.encoder().windows(&text).expect("windows")[0].len() - 2;
        if n >= tokens {
            return text;
        }
    }
}

fn bench(c: &mut Criterion) {
    let dir = PathBuf::from(
        std::env::var("SLUICE_GUARD_MODEL")
            .expect("set SLUICE_GUARD_MODEL=$(scripts/fetch-guard-model)"),
    );
    let mut variants = vec![("", Classifier::load(&dir).expect("load the classifier"))];
    if let Ok(gguf) = std::env::var("SLUICE_GUARD_PROBE_MODEL") {
        let with = Classifier::load(&dir)
            .and_then(|c| c.with_probe(&PathBuf::from(gguf)))
            .expect("load the classifier with the probe");
        variants.push(("with_probe/", with));
    }
    for (prefix, classifier) in &variants {
        bench_one(c, prefix, classifier);
    }
}

fn bench_one(c: &mut Criterion, prefix: &str, classifier: &Classifier) {
    let mut group = c.benchmark_group("classifier");
    group.sample_size(20);
    for tokens in [64, 512] {
        let text = vec![text_of(classifier, tokens)];
        group.throughput(Throughput::Elements(1));
        group.bench_with_input(
            BenchmarkId::new(format!("{prefix}one_text_tokens"), tokens),
            &text,
            |b, t| {
                b.iter(|| classifier.score(std::hint::black_box(t)).expect("score"));
            },
        );
    }
    let batch = vec![text_of(classifier, 64); 8];
    group.throughput(Throughput::Elements(8));
    group.bench_with_input(
        BenchmarkId::new(format!("{prefix}eight_texts_tokens"), 64),
        &batch,
        |b, t| {
            b.iter(|| classifier.score(std::hint::black_box(t)).expect("score"));
        },
    );
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
