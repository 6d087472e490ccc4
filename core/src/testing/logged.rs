//! A log written to memory, for tests that read what a worker logs.

use std::sync::{Arc, Mutex};

/// What the subscriber [`Logged::on_this_thread`] sets writes, kept to be read back.
#[derive(Clone, Default)]
pub struct Logged(Arc<Mutex<Vec<u8>>>);

impl Logged {
    /// Logs everything this thread logs from now until the guard is dropped (a test's body on a
    /// tokio test runtime runs on its thread; spawned tasks do not).
    pub fn on_this_thread() -> (Self, tracing::subscriber::DefaultGuard) {
        let logged = Self::default();
        let subscriber = tracing_subscriber::fmt().with_writer(logged.clone()).with_ansi(false).finish();
        (logged, tracing::subscriber::set_default(subscriber))
    }

    /// What was logged so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }
}

impl std::io::Write for Logged {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logged {
    type Writer = Logged;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}
