//! Token counting at several text sizes. (Trimming stored history is timed end to end, from
//! storage, by `store/replay` and the turn benches, not here.)

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use parley::tokens::{count, Encoding};

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

criterion_group!(benches, bench_count);
criterion_main!(benches);
