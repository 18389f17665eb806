//! The guard pipeline (hygiene, injection scan with decoding, PII detection and redaction) on
//! 1 KB, 4 KB and 64 KB prompts. Target: under 100 µs for 4 KB on one core, linear in size.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use sluice_guard::{Guard, GuardConfig};

/// Ordinary multilingual prompt text with a little personal data, repeated to `size` bytes.
fn prompt(size: usize) -> String {
    const PARTS: [&str; 6] = [
        "Could you summarise the quarterly report and list the three biggest risks? ",
        "The customer wrote to support@example.com about order 4471 and wants a refund. ",
        "请帮我把这段话翻译成英文，并保持语气礼貌。我们的退货政策是三十天内无理由退货。 ",
        "fn main() { let total: u64 = items.iter().map(|i| i.price).sum(); println!(\"{total}\"); } ",
        "Der Bericht ist fertig; bitte prüfe die Zahlen bis Freitag. ",
        "Mon numéro est le +33 6 12 34 56 78, rappelle-moi demain matin. ",
    ];
    let mut text = String::with_capacity(size + 128);
    let mut i = 0;
    while text.len() < size {
        text.push_str(PARTS[i % PARTS.len()]);
        i += 1;
    }
    let mut cut = size.min(text.len());
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text.truncate(cut);
    text
}

fn bench(c: &mut Criterion) {
    let guard = Guard::with_builtin(None);
    let config = GuardConfig::default();
    let mut group = c.benchmark_group("guard_check");
    for size in [1024, 4096, 65536] {
        let text = prompt(size);
        group.throughput(Throughput::Bytes(text.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &text, |b, text| {
            b.iter(|| guard.check(std::hint::black_box(text), &config));
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
