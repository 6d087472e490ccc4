//! `sluice`: the operator's command line.

use std::path::PathBuf;

use anyhow::anyhow;
use clap::{Parser, Subcommand};
use sluice_cli::{
    bench, demo, dlq, feedback, load, load_bench, monitor, out, outln, pipeline, pipeline_bench, produce, report,
    resnet18, results, review, top, train,
};
use sluice_core::backend::Backend;
use sluice_core::config::{BackendKind, Settings, StoreArgs};
use sluice_core::service::spawn_health_endpoints;
use sluice_core::stats::PipelineStats;
use sluice_core::telemetry::health::Health;
use sluice_core::topology::StageName;

#[derive(Debug, Parser)]
#[command(name = "sluice", version, about = "A queue-driven streaming ML inference pipeline")]
struct Cli {
    /// TOML configuration file (environment `SLUICE__SECTION__KEY` overrides it).
    #[arg(long, global = true, env = "SLUICE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole pipeline on the held-out digits (and a few corrupt records) and print a
    /// summary: on a fresh embedded store, or with `--backend aws` on fresh AWS resources.
    Demo(demo::DemoArgs),
    /// Write records to the stream.
    Produce {
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        args: produce::ProduceArgs,
    },
    /// Train the digits CNN and write its model bundle.
    Train(train::TrainArgs),
    /// Make a model bundle from weights trained elsewhere.
    Bundle {
        #[command(subcommand)]
        command: BundleCommand,
    },
    /// Measure against a baseline, side by side.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
    /// Run all four stages in this process.
    Run {
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        inference: sluice_inference::InferenceArgs,
        /// Exit 0 once the stream and every work queue are empty.
        #[arg(long)]
        until_drained: bool,
    },
    /// Where every record is: stream, queues, results, review, DLQs (a table; `--json` for the numbers).
    Stats {
        #[command(flatten)]
        store: StoreArgs,
        #[arg(long)]
        json: bool,
    },
    /// Write a consistent copy of the embedded store to a new file, workers running or not (a
    /// `cp` of the file is not one: the store is in WAL mode). On AWS the tables have
    /// point-in-time recovery instead.
    Backup {
        #[command(flatten)]
        store: StoreArgs,
        /// The copy: a file that does not exist yet.
        to: PathBuf,
    },
    /// Walk the review queue in a terminal and label what the model was unsure about (or label
    /// one item with `--label ID LABEL`).
    Review(review::ReviewArgs),
    /// Watch the pipeline live: rates, queue depths, lag, DLQ growth, latency percentiles.
    Top {
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        args: top::TopArgs,
    },
    /// List stored results in the order they were stored (e.g. `--status review` for the review queue).
    Results(results::ResultsArgs),
    /// Serve the results and review HTTP API (`GET /results`, `POST /review/{id}`, `/openapi.json`).
    Serve {
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        serve: sluice_api::ServeArgs,
    },
    /// Work with AWS resources.
    Aws {
        #[command(subcommand)]
        command: AwsCommand,
    },
    /// Inspect and replay dead-letter queues.
    Dlq {
        #[command(subcommand)]
        command: dlq::DlqCommand,
    },
    /// Record true labels for results, by record id, from a CSV or JSON-lines file.
    Feedback(feedback::FeedbackArgs),
    /// Judge accuracy and drift over the rolling window and alert on crossings (once, or `--watch`).
    Monitor(monitor::MonitorArgs),
    /// Write the monitoring report: one HTML page of charts, readable offline.
    Report(report::ReportArgs),
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Candle against ONNX Runtime: images/s and per-batch latency by batch size, same model,
    /// weights, inputs and threads (needs `pip install -r bench/requirements.txt`).
    Inference(bench::BenchInferenceArgs),
    /// Candle on the GPU at each precision against Candle on the CPU (f32) and PyTorch eager on
    /// the same GPU, outputs checked first (a build with `--features cuda`; `bench/gpu_check.sh`
    /// builds and runs it).
    Cuda(bench::BenchCudaArgs),
    /// The whole pipeline on the embedded store against a bare decode-preprocess-infer loop,
    /// same records: records/s, the ratio, busy time per stage, latency.
    Pipeline(pipeline_bench::BenchPipelineArgs),
    /// Latency under a steady load: the whole pipeline at 50% and 90% of its capacity,
    /// end-to-end p50/p95/p99, time at each stage, whether the backlog stayed bounded.
    Load(load_bench::BenchLoadArgs),
}

#[derive(Debug, Subcommand)]
enum BundleCommand {
    /// A torchvision ResNet-18 (safetensors with torchvision's names) and its labels, with
    /// ImageNet preprocessing (shorter side 256, centre crop 224×224, ImageNet mean and std).
    Resnet18(resnet18::BundleResnet18Args),
}

#[derive(Debug, Subcommand)]
enum AwsCommand {
    /// Create the stream, queues (with DLQs and redrive policies), tables and bucket of a
    /// pipeline, for local development and tests. Safe to run again.
    Bootstrap {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Check that every resource the workers of a prefix use exists (a deployed stack, say) and
    /// that the work queues redrive after `store.max_receives` receives, creating nothing; exits
    /// non-zero naming whatever is missing or differs.
    Check {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Delete every resource of a prefix that bootstrap makes (a demo's, say): the stream,
    /// queues, tables, and the bucket with what it holds. Asks first, unless `--yes`. Refuses a
    /// deployed stack's: `cdk destroy` takes those down.
    Teardown {
        #[command(flatten)]
        store: StoreArgs,
        /// Do not ask.
        #[arg(long)]
        yes: bool,
    },
}

/// The model's threads when every stage runs in this process. On the embedded store the model
/// gets half the cores and the other three stages the rest (measured in docs/benchmarks.md: on
/// 2 cores the model's thread pools spinning for a core another stage's store work holds cost
/// more than a second thread gains). On AWS the other stages wait on the network, not on a
/// core: the model gets every core (0).
fn all_stages_model_threads(store: &StoreArgs, settings: &Settings) -> usize {
    match store.apply(settings.clone()).store().map(|s| s.backend) {
        Ok(BackendKind::Aws) => 0,
        _ => sluice_core::threads::half_the_cores(),
    }
}

/// The error on one line, its causes after it (`Error: a: b`), and exit status 1: not the
/// `Debug` form a `main` returning the error prints, which adds a backtrace wherever
/// `RUST_BACKTRACE` is set, as many Rust developers keep it.
fn main() -> std::process::ExitCode {
    match sluice() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // The reader of the output went away (`| head`): it has what it wanted.
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn sluice() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The demo's and the benches' output is their summary; the workers' logs would bury it.
    let quiet = matches!(cli.command, Command::Demo(_) | Command::Bench { .. });
    let settings = Settings::load(cli.config.as_deref())?;
    let configured = sluice_core::threads::configured(&settings);
    let threads = match &cli.command {
        Command::Bench { command: BenchCommand::Inference(args) } => args.bench.threads.unwrap_or(configured),
        Command::Bench { command: BenchCommand::Cuda(args) } => args.bench.threads.unwrap_or(configured),
        Command::Demo(demo::DemoArgs { store, .. }) | Command::Run { store, .. } if configured == 0 => {
            all_stages_model_threads(store, &settings)
        }
        Command::Bench { command: BenchCommand::Pipeline(_) | BenchCommand::Load(_) } if configured == 0 => {
            sluice_core::threads::half_the_cores()
        }
        _ => configured,
    };
    // Before any thread starts.
    sluice_core::threads::pin(threads);
    let _telemetry = sluice_core::telemetry::init("sluice", if quiet { "warn" } else { "info" });
    if let Command::Train(args) = &cli.command {
        let report = train::train(args)?;
        outln!("{}", serde_json::to_string_pretty(&report)?)?;
        eprintln!("bundle written to {}", args.out.display());
        return Ok(());
    }
    if let Command::Bundle { command: BundleCommand::Resnet18(args) } = &cli.command {
        let bundle = resnet18::bundle(args)?;
        outln!("bundle written to {} ({} classes)", bundle.dir.display(), bundle.manifest.labels.len())?;
        return Ok(());
    }
    if let Command::Bench { command } = &cli.command {
        let (reports, json) = match command {
            BenchCommand::Inference(args) => (bench::bench_inference(args)?, args.bench.json),
            BenchCommand::Cuda(args) => (bench::bench_cuda(args)?, args.bench.json),
            BenchCommand::Pipeline(args) => {
                let runtime = tokio::runtime::Runtime::new()?;
                return print_report(
                    &runtime.block_on(pipeline_bench::bench_pipeline(args, settings.clone()))?,
                    args.json,
                );
            }
            BenchCommand::Load(args) => {
                let runtime = tokio::runtime::Runtime::new()?;
                return print_report(&runtime.block_on(load_bench::bench_load(args, settings.clone()))?, args.json);
            }
        };
        if json {
            outln!("{}", serde_json::to_string_pretty(&reports)?)?;
        } else {
            for report in &reports {
                report.print_text()?;
                outln!()?;
            }
        }
        return Ok(());
    }
    let runtime = tokio::runtime::Runtime::new()?;
    let ran = runtime.block_on(run(cli.command, settings));
    // As a worker binary does: a model call still running does not hold the exit past the grace.
    runtime.shutdown_timeout(sluice_core::service::RUNTIME_WIND_DOWN);
    ran
}

async fn run(command: Command, settings: Settings) -> anyhow::Result<()> {
    match command {
        Command::Train(_) | Command::Bundle { .. } | Command::Bench { .. } => {
            unreachable!("handled before the runtime starts")
        }
        Command::Demo(args) => {
            let summary = demo::demo(&args, settings).await?;
            if args.json {
                outln!("{}", serde_json::to_string(&summary)?)?;
            } else {
                summary.print_text()?;
            }
        }
        Command::Produce { store, args } => {
            let settings = store.apply(settings);
            let backend = Backend::open_to_produce(&settings.store()?).await?;
            // Written as ingest will take them: what it refuses inline travels as a claim-check.
            let ingest: sluice_ingest::IngestConfig = settings.section("ingest")?;
            // Ctrl-C stops between two stream calls, and says how far it got; twice, at once.
            let stop = sluice_core::shutdown::stop_on_signal();
            if let (Some(rate), Some(duration)) = (args.rate, args.duration) {
                let catalogue = produce::catalogue_for(&args)?;
                let report = load::run(&backend, &catalogue, rate, duration, args.pattern, &ingest, &stop).await?;
                outln!("{report}{}", if stop.is_cancelled() { " (stopped before the end)" } else { "" })?;
            } else {
                let records = produce::records_for(&args)?;
                let total = records.len();
                let report = produce::put_until(&backend, records, &ingest, &stop).await?;
                outln!("produced {} records", report.records)?;
                if stop.is_cancelled() && report.records < total as u64 {
                    outln!("stopped before the end: {} of {total} were not written", total as u64 - report.records)?;
                }
                if report.retried > 0 {
                    outln!(
                        "the stream refused {} of them at first ({} throttled); all were sent again",
                        report.retried,
                        report.throttled
                    )?;
                }
            }
        }
        Command::Run { store, inference, until_drained } => {
            let settings = inference.apply(store.apply(settings));
            let shutdown = sluice_core::shutdown::on_signal();
            let health = Health::new(StageName::ALL.len());
            let _endpoints = spawn_health_endpoints(&settings, None, health.clone()).map_err(|e| anyhow!(e))?;
            pipeline::run_all(&settings, shutdown, until_drained, &health).await?;
        }
        Command::Stats { store, json } => {
            let stats = PipelineStats::collect(&open(&store.apply(settings)).await?).await?;
            // Written, not printed: a reader gone (`| head`) is a broken pipe to pass over, not a panic.
            let text = if json {
                serde_json::to_string(&sluice_cli::stats::to_json(&stats)?)? + "\n"
            } else {
                sluice_cli::stats::render(&stats)
            };
            std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes())?;
        }
        Command::Backup { store, to } => {
            let config = store.apply(settings).store()?;
            anyhow::ensure!(
                config.backend == BackendKind::Embedded,
                "backup copies the embedded store; on AWS the DynamoDB tables have point-in-time recovery \
                 (docs/operations.md)"
            );
            sluice_core::backend::embedded::EmbeddedStore::open_separate(&config)?.backup(&to).await?;
            eprintln!("{} backed up to {}", config.path.display(), to.display());
        }
        Command::Top { store, args } => {
            let settings = store.apply(settings);
            let endpoints = top::endpoints(&args, &settings.telemetry()?);
            // Started before the workers, `top` waits for their store (with `--once`, it does not).
            let backend =
                if args.once { open(&settings).await? } else { Backend::open_watcher(&settings.store()?).await? };
            top::top(&backend, &settings.store()?.identity(), &args, &endpoints).await?;
        }
        Command::Aws { command: AwsCommand::Bootstrap { store } } => {
            let store = store.apply(settings).set("store.backend", "aws").store()?;
            let made = sluice_core::backend::aws::bootstrap::bootstrap(&store).await?;
            outln!("{}", serde_json::to_string_pretty(&made)?)?;
        }
        Command::Aws { command: AwsCommand::Teardown { store, yes } } => {
            // Never the configured default by accident: what goes is named on the command line.
            anyhow::ensure!(store.prefix.is_some(), "teardown deletes for good: name the prefix with --prefix");
            let store = store.apply(settings).set("store.backend", "aws").store()?;
            let question = format!(
                "delete the stream, queues, tables and bucket (with what it holds) of prefix {:?} for good?",
                store.aws.prefix
            );
            if !yes && !sluice_cli::dlq::confirm(&question)? {
                anyhow::bail!("nothing deleted");
            }
            let done = sluice_core::backend::aws::bootstrap::teardown(&store).await?;
            outln!("{}", serde_json::to_string_pretty(&done)?)?;
        }
        Command::Aws { command: AwsCommand::Check { store } } => {
            let store = store.apply(settings).set("store.backend", "aws").store()?;
            let found = sluice_core::backend::aws::bootstrap::check(&store).await?;
            outln!("{}", serde_json::to_string_pretty(&found)?)?;
        }
        Command::Results(args) => results::run(args, settings).await?,
        Command::Serve { store, serve } => {
            sluice_api::run(&store.apply(settings), &serve).await.map_err(|e| anyhow!(e))?;
        }
        Command::Dlq { command } => dlq::run(command, settings).await?,
        Command::Feedback(args) => {
            let report = feedback::run(&args, settings).await?;
            if args.json {
                outln!("{}", serde_json::to_string(&report)?)?;
            } else {
                feedback::print_text(&report)?;
            }
        }
        Command::Monitor(args) => monitor::run(&args, settings).await?,
        Command::Report(args) => {
            let summary = report::run(&args, settings).await?;
            if args.json {
                outln!("{}", serde_json::to_string(&summary)?)?;
            } else {
                report::print_text(&summary)?;
            }
        }
        Command::Review(args) => {
            let settings = args.store.apply(settings);
            let backend = open(&settings).await?;
            let manifest = sluice_core::model::ModelBundle::load(settings.model()?.dir)?.manifest;
            // Each reads the review queue, and holds what it reads: Ctrl-C gives it back.
            sluice_core::shutdown::interrupt_on_signal();
            match (args.label.as_deref(), &args.reject) {
                (Some([id, label]), _) => outln!("{}", review::label_one(&backend, &manifest, id, label).await?)?,
                (_, Some(id)) => outln!("{}", review::reject_one(&backend, id).await?)?,
                _ => review::walk(&backend, &manifest, args.save.as_ref()).await?,
            }
        }
    }
    Ok(())
}

/// A bench's report: pretty JSON, or its text.
fn print_report(report: &(impl serde::Serialize + std::fmt::Display), json: bool) -> anyhow::Result<()> {
    if json {
        outln!("{}", serde_json::to_string_pretty(report)?)?;
    } else {
        out!("{report}")?;
    }
    Ok(())
}

async fn open(settings: &Settings) -> anyhow::Result<Backend> {
    Ok(Backend::open_observer(&settings.store()?).await?)
}
