//! Turns SIGTERM and SIGINT into a cancellation token the worker loops watch; and, for the
//! commands that hold queue entries hidden while they read them (a DLQ look, replay or purge),
//! into a stop that gives those entries back before the process ends.

use std::sync::LazyLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio_util::sync::CancellationToken;

/// A token cancelled on the first SIGTERM or SIGINT; a second ends the process at once, as it
/// would without a handler (once listened for, a signal no longer ends the process by itself:
/// a second Ctrl-C during a worker's grace did nothing).
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    let mut signals = Signals::new();
    tokio::spawn(async move {
        signals.next().await;
        tracing::info!("shutdown signal received: finishing in-flight work (again to quit at once)");
        trigger.cancel();
        std::process::exit(signals.next().await);
    });
    token
}

/// SIGTERM and SIGINT, listened for from when this is made (none is missed between two `next`s).
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    #[cfg(unix)]
    fn new() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        Self {
            term: signal(SignalKind::terminate()).expect("SIGTERM handler"),
            int: signal(SignalKind::interrupt()).expect("SIGINT handler"),
        }
    }

    #[cfg(not(unix))]
    fn new() -> Self {
        Self {}
    }

    /// The next signal, as the status a process it ended would have (128 + its number).
    #[cfg(unix)]
    async fn next(&mut self) -> i32 {
        tokio::select! {
            _ = self.term.recv() => 143,
            _ = self.int.recv() => 130,
        }
    }

    #[cfg(not(unix))]
    async fn next(&mut self) -> i32 {
        let _ = tokio::signal::ctrl_c().await;
        130
    }
}

/// For a command that stops between steps (`sluice produce`): the first SIGINT or SIGTERM
/// cancels the token (the step under way is seen through), a second ends the process at once,
/// as it would without a handler.
pub fn stop_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    let mut signals = Signals::new();
    tokio::spawn(async move {
        signals.next().await;
        eprintln!("stopping once the stream call under way is done (again to quit at once)");
        trigger.cancel();
        std::process::exit(signals.next().await);
    });
    token
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
///
/// The interrupt is process-wide, as the signal is: every look, replay and purge of `dlq` (in
/// core, called from the CLI and the API alike) would otherwise need a token passed down to the
/// queue's `peek`. Only a command that calls [`interrupt_on_signal`] is ever interrupted.
pub struct Holding(());

impl Holding {
    /// Holding from now until dropped.
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
    let mut signals = Signals::new();
    tokio::spawn(async move {
        loop {
            let status = signals.next().await;
            if HOLDING.load(Ordering::SeqCst) == 0 || INTERRUPT.is_cancelled() {
                std::process::exit(status);
            }
            eprintln!("interrupted: giving back the entries held (again to quit at once)");
            INTERRUPT.cancel();
        }
    });
}
