//! Token counting and context trimming at several history sizes.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use parley::tokens::{count, fit_history, ContextBudget, Encoding};

fn paragraph(i: usize) -> String {
    format!(
        "Message {i}: the quick brown fox jumps over the lazy dog while parley keeps the \
         conversation in storage and sends only what fits the budget upstream. "
    )
    .repeat(4)
}

fn bench_count(c: &mut Criterion) {
    let mut group = c.benchmark_group("tokens/count");
    for paragraphs in [1usize, 10, 100] {
        let text: String = (0..paragraphs).map(paragraph).collect();
        group.throughput(Throughput::Bytes(text.len() as u64));
        group.bench_with_input(BenchmarkId::new("cl100k", text.len()), &text, |b, t| {
            b.iter(|| count(Encoding::Cl100kBase, black_box(t)));
        });
        group.bench_with_input(BenchmarkId::new("o200k", text.len()), &text, |b, t| {
            b.iter(|| count(Encoding::O200kBase, black_box(t)));
        });
    }
    group.finish();
}

fn bench_trim(c: &mut Criterion) {
    let mut group = c.benchmark_group("tokens/trim");
    let budget = ContextBudget::new(8192, 1024);
    for messages in [10usize, 100, 1_000, 10_000] {
        let history: Vec<u32> = (0..messages).map(|i| 40 + (i as u32 * 7) % 200).collect();
        group.bench_with_input(BenchmarkId::from_parameter(messages), &history, |b, h| {
            b.iter(|| fit_history(budget, Some(120), 80, h.iter().copied()));
        });
    }
    group.finish();
}

criterion_group!(benches, bench_count, bench_trim);
criterion_main!(benches);
