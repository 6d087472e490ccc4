//! A fault-injecting proxy in front of a local AWS stand-in, by hand:
//!
//! ```text
//! cargo run -p sluice-core --example fault_proxy -- http://127.0.0.1:5000 0.05 [PORT]
//! ```
//!
//! then point `--endpoint-url` (or `SLUICE__STORE__AWS__ENDPOINT_URL`) at the address it prints.
//! RATE is the share of requests faulted, spread over throttling, 5xx, latency and dropped
//! connections. Ctrl-C prints what it did.

use sluice_core::testing::{FaultProxy, FaultRates};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [upstream, rate, rest @ ..] = args.as_slice() else {
        return Err("usage: fault_proxy UPSTREAM RATE [PORT]".into());
    };
    let port = rest.first().map(|p| p.parse()).transpose()?.unwrap_or(0);
    let proxy = FaultProxy::start_on(port, upstream, FaultRates::spread(rate.parse()?), 1)?;
    println!("{} → {upstream}, faulting {rate} of requests", proxy.url);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(tokio::signal::ctrl_c())?;
    println!("{}", serde_json::to_string(&proxy.counts())?);
    Ok(())
}
