use sluice_guard::{decode, injection::Rules, skeleton, unicode};
use std::time::Instant;

fn corpus_text(lang: &str, bytes: usize) -> String {
    let src = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/corpus/benign.jsonl"
    ))
    .unwrap();
    let mut out = String::new();
    'outer: loop {
        for line in src.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            if v["lang"] == lang {
                let t = v["text"].as_str().unwrap();
                if out.len() + t.len() > bytes {
                    break 'outer;
                }
                out.push_str(t);
                out.push(' ');
            }
        }
    }
    out
}

fn time<F: FnMut()>(name: &str, mut f: F) {
    for _ in 0..20 {
        f();
    }
    let n = 100;
    let mut best = f64::MAX;
    for _ in 0..7 {
        let t = Instant::now();
        for _ in 0..n {
            f();
        }
        best = best.min(t.elapsed().as_secs_f64() * 1e6 / n as f64);
    }
    println!("{name:<30} {best:>8.1} µs");
}

#[test]
fn timing() {
    let rules = Rules::builtin();
    for lang in ["en", "zh", "fr", "ja"] {
        let text = corpus_text(lang, 4096);
        println!("{lang}: {} bytes", text.len());
        time("clean", || {
            std::hint::black_box(unicode::clean(&text));
        });
        time("skeleton_lines", || {
            std::hint::black_box(skeleton::skeleton_lines(&text));
        });
        time("decoded_layers", || {
            std::hint::black_box(decode::decoded_layers(&text, Default::default()));
        });
        time("scan", || {
            std::hint::black_box(rules.scan(&text));
        });
        println!(
            "layers: {}",
            decode::decoded_layers(&text, Default::default()).len()
        );
    }
}
