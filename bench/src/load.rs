//! Load drivers and latency samples.
//!
//! A closed loop keeps `clients` requests in flight (each client sends its next request
//! when the previous one answered): it finds the maximum rate. An open loop sends at a
//! fixed rate whatever the answers do, and measures each latency from the moment the
//! request was *due*, so a stall shows up in the percentiles instead of silently slowing
//! the sender down (no coordinated omission).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Semaphore};

/// What one request came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Accepted; a command's global position when it answered one.
    Ok(Option<i64>),
    /// Refused by a business rule (an expected answer, not an error).
    Refused(String),
    /// Anything else: a transport error, a 5xx, an unexpected status.
    Failed(String),
}

/// Latencies and outcomes of one measured phase.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    pub ok: u64,
    pub refused: u64,
    pub failed: u64,
    pub first_failure: Option<String>,
    pub first_refusal: Option<String>,
    pub seconds: f64,
    /// Microseconds, sorted.
    latencies: Vec<u32>,
}

impl Sample {
    fn record(&mut self, outcome: Outcome, latency: Duration) {
        match outcome {
            Outcome::Ok(_) => self.ok += 1,
            Outcome::Refused(code) => {
                self.refused += 1;
                self.first_refusal.get_or_insert(code);
            }
            Outcome::Failed(why) => {
                self.failed += 1;
                self.first_failure.get_or_insert(why);
            }
        }
        self.latencies
            .push(u32::try_from(latency.as_micros()).unwrap_or(u32::MAX));
    }

    fn finish(mut self, seconds: f64) -> Self {
        self.seconds = seconds;
        self.latencies.sort_unstable();
        self
    }

    /// Answers (accepted or refused) per second.
    pub fn rate(&self) -> f64 {
        (self.ok + self.refused) as f64 / self.seconds.max(1e-9)
    }

    /// The `q`-quantile latency in milliseconds (nearest rank).
    pub fn quantile_ms(&self, q: f64) -> f64 {
        quantile(&self.latencies, q) as f64 / 1000.0
    }

    pub fn count(&self) -> usize {
        self.latencies.len()
    }
}

/// Nearest-rank quantile of sorted values.
pub fn quantile<T: Copy + Default>(sorted: &[T], q: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// `clients` concurrent loops of `op(client, iteration)` for `warmup + duration`; only
/// requests sent after the warm-up are recorded.
pub async fn closed_loop<F, Fut>(
    clients: usize,
    warmup: Duration,
    duration: Duration,
    op: F,
) -> Sample
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let op = Arc::new(op);
    let start = Instant::now();
    let measured_from = start + warmup;
    let end = measured_from + duration;
    let mut tasks = Vec::with_capacity(clients);
    for client in 0..clients {
        let op = Arc::clone(&op);
        tasks.push(tokio::spawn(async move {
            let mut sample = Sample::default();
            let mut iteration = 0u64;
            loop {
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                let outcome = op(client, iteration).await;
                iteration += 1;
                if sent >= measured_from {
                    sample.record(outcome, sent.elapsed());
                }
            }
            sample
        }));
    }
    let mut total = Sample::default();
    for task in tasks {
        match task.await {
            Ok(sample) => merge(&mut total, sample),
            Err(error) => {
                total.failed += 1;
                total.first_failure.get_or_insert(error.to_string());
            }
        }
    }
    let seconds = (Instant::now().min(end) - measured_from).as_secs_f64();
    total.finish(seconds)
}

/// How many of an open loop's first requests are its warm-up: those due within `warmup`.
pub fn warmup_requests(rate: f64, warmup: Duration) -> u64 {
    (warmup.as_secs_f64() * rate).ceil() as u64
}

/// `op(k)` sent at `rate` per second for `warmup + duration`, with at most `connections`
/// requests in flight; each latency counts from the moment its request was due. The
/// first [`warmup_requests`] are sent like the rest but not recorded.
///
/// The requests are paced by a thread of their own, not by the runtime's timers: those
/// tick once a millisecond, so at a few thousand requests a second they would send the
/// requests due within each tick together, a burst the rate does not ask for. The thread
/// sleeps to each due time (the kernel wakes it within tens of microseconds) and hands
/// the request to the runtime; a request that finds every connection busy waits for one,
/// in order, and that wait counts in its latency.
pub async fn open_loop<F, Fut>(
    rate: f64,
    connections: usize,
    warmup: Duration,
    duration: Duration,
    op: F,
) -> Sample
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let op = Arc::new(op);
    let slots = Arc::new(Semaphore::new(connections));
    let (done, mut results) = mpsc::unbounded_channel();
    let interval = Duration::from_secs_f64(1.0 / rate.max(1e-3));
    let unmeasured = warmup_requests(rate, warmup);
    let count = unmeasured + (duration.as_secs_f64() * rate).floor() as u64;
    let runtime = tokio::runtime::Handle::current();
    let pacer = std::thread::Builder::new()
        .name("open-loop".into())
        .spawn(move || {
            let start = Instant::now();
            for k in 0..count {
                let due = start + interval.mul_f64(k as f64);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let (op, slots, done) = (Arc::clone(&op), Arc::clone(&slots), done.clone());
                runtime.spawn(async move {
                    let Ok(slot) = slots.acquire_owned().await else {
                        return;
                    };
                    let outcome = op(k).await;
                    drop(slot);
                    if k >= unmeasured {
                        let _ = done.send((outcome, due.elapsed()));
                    }
                });
            }
        });
    let mut sample = Sample::default();
    if let Err(error) = pacer {
        sample.failed += 1;
        sample.first_failure = Some(format!("starting the pacing thread: {error}"));
        return sample.finish(duration.as_secs_f64());
    }
    // The channel closes when the pacer has sent every request and each has answered.
    while let Some((outcome, latency)) = results.recv().await {
        sample.record(outcome, latency);
    }
    sample.finish(duration.as_secs_f64())
}

fn merge(total: &mut Sample, part: Sample) {
    total.ok += part.ok;
    total.refused += part.refused;
    total.failed += part.failed;
    if total.first_failure.is_none() {
        total.first_failure = part.first_failure;
    }
    if total.first_refusal.is_none() {
        total.first_refusal = part.first_refusal;
    }
    total.latencies.extend(part.latencies);
}

/// The median of some values (the mean of the middle two for an even count).
pub fn median(values: &[f64]) -> f64 {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    if sorted.len().is_multiple_of(2) {
        (sorted[middle - 1] + sorted[middle]) / 2.0
    } else {
        sorted[middle]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_use_the_nearest_rank() {
        let values: Vec<u32> = (1..=100).collect();
        assert_eq!(quantile(&values, 0.5), 50);
        assert_eq!(quantile(&values, 0.99), 99);
        assert_eq!(quantile(&values, 1.0), 100);
        assert_eq!(quantile::<u32>(&[], 0.99), 0);
    }

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[tokio::test]
    async fn an_open_loop_counts_latency_from_the_due_time() {
        // One connection, 100 requests per second, each taking 30 ms: requests queue up,
        // and the measured latency must grow beyond the 30 ms service time.
        let sample = open_loop(
            100.0,
            1,
            Duration::ZERO,
            Duration::from_millis(300),
            |_| async {
                tokio::time::sleep(Duration::from_millis(30)).await;
                Outcome::Ok(None)
            },
        )
        .await;
        assert_eq!(sample.count(), 30);
        assert!(
            sample.quantile_ms(0.99) > 300.0,
            "{}",
            sample.quantile_ms(0.99)
        );
    }

    #[tokio::test]
    async fn an_open_loop_sends_its_warm_up_but_does_not_record_it() {
        let calls = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = Arc::clone(&calls);
        let sample = open_loop(
            100.0,
            4,
            Duration::from_millis(100),
            Duration::from_millis(300),
            move |_| {
                counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                async { Outcome::Ok(None) }
            },
        )
        .await;
        assert_eq!(warmup_requests(100.0, Duration::from_millis(100)), 10);
        assert_eq!(calls.load(std::sync::atomic::Ordering::Relaxed), 40);
        assert_eq!(sample.count(), 30);
        assert_eq!(sample.ok, 30);
    }
}
