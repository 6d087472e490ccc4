//! Turns SIGTERM and SIGINT into a cancellation token the worker loops watch; and, for the
//! commands that hold queue entries hidden while they read them (a DLQ look, replay or purge),
//! into a stop that gives those entries back before the process ends.

use std::sync::LazyLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio_util::sync::CancellationToken;

/// A token cancelled on the first SIGTERM or SIGINT.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown signal received: finishing in-flight work");
        trigger.cancel();
    });
    token
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}

/// Cancelled by the first signal that comes while something is [`Holding`] entries.
static INTERRUPT: LazyLock<CancellationToken> = LazyLock::new(CancellationToken::new);
/// How many [`Holding`]s are alive.
static HOLDING: AtomicUsize = AtomicUsize::new(0);

/// Whether a signal asked the work that holds entries to stop (see [`interrupt_on_signal`]).
pub fn interrupted() -> bool {
    INTERRUPT.is_cancelled()
}

/// Resolves once [`interrupted`].
pub async fn until_interrupted() {
    INTERRUPT.cancelled().await
}

/// Alive while a reader holds queue entries hidden (an SQS receive hides what it reads until
/// given back): a signal then stops the reading, and the entries are given back, where the
/// default end of the process would leave them hidden for their visibility timeout.
pub struct Holding(());

impl Holding {
    pub fn start() -> Self {
        HOLDING.fetch_add(1, Ordering::SeqCst);
        Self(())
    }
}

impl Drop for Holding {
    fn drop(&mut self) {
        HOLDING.fetch_sub(1, Ordering::SeqCst);
    }
}

/// For a command: SIGINT or SIGTERM while something is [`Holding`] makes [`interrupted`] true
/// (the holder gives back what it holds and returns); otherwise, or a second time, the process
/// ends at once, as it would without a handler (status 130).
pub fn interrupt_on_signal() {
    tokio::spawn(async {
        loop {
            wait_for_signal().await;
            if HOLDING.load(Ordering::SeqCst) == 0 || INTERRUPT.is_cancelled() {
                std::process::exit(130);
            }
            eprintln!("interrupted: giving back the entries held (again to quit at once)");
            INTERRUPT.cancel();
        }
    });
}
