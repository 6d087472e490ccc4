//! `sluice dlq list|show|stats|replay|purge`: what operators do with dead letters and review
//! items (the work is in `sluice_core::dlq`).

use std::io::{BufRead, IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context, bail};
use sluice_core::ReasonCode;
use sluice_core::backend::Backend;
use sluice_core::config::{Settings, StoreArgs};
use sluice_core::dlq::{self, Delete, Fate, Filter, Item, Letters, Rejudge, ReplayOptions, SendTo};
use sluice_core::model::ModelBundle;
use sluice_core::topology::StageName;

#[derive(Debug, clap::Subcommand)]
pub enum DlqCommand {
    /// List entries, oldest first.
    List {
        #[command(flatten)]
        store: StoreArgs,
        /// ingest, features, inference, results, or review.
        #[arg(long)]
        stage: Letters,
        #[command(flatten)]
        filter: FilterArgs,
        /// The most entries to list (a line on stderr says how many more match).
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// One JSON object a line.
        #[arg(long)]
        json: bool,
    },
    /// One entry in full: reason, attempts, failure times, detail, the record's attributes, and
    /// for a review item the class, confidence and probabilities.
    Show {
        #[command(flatten)]
        store: StoreArgs,
        /// The record id.
        id: String,
        /// Where to look (default: every DLQ and the review queue).
        #[arg(long)]
        stage: Option<Letters>,
        /// The entry as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Entries of every DLQ and the review queue, by reason, and the oldest one's age.
    Stats {
        #[command(flatten)]
        store: StoreArgs,
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Send entries back to work: to the stage that failed them (or `--to`), unchanged. Review
    /// items are judged again under the model bundle's current thresholds: those that clear
    /// them are accepted, the rest stay for a person.
    Replay {
        #[command(flatten)]
        store: StoreArgs,
        /// Whose entries: ingest, features, inference, results, or review.
        #[arg(long)]
        stage: Letters,
        #[command(flatten)]
        filter: FilterArgs,
        /// Send them to this stage instead (only where it reads what the entries hold: the
        /// features DLQ's envelopes to ingest).
        #[arg(long)]
        to: Option<StageName>,
        /// List what would move, and move nothing.
        #[arg(long)]
        dry_run: bool,
        /// The most entries to move.
        #[arg(long)]
        limit: Option<usize>,
        /// At most this many entries a second (more than 0).
        #[arg(long, value_parser = parse_rate)]
        rate: Option<f64>,
        /// What moved, as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete entries for good (asks first, unless `--yes`).
    Purge {
        #[command(flatten)]
        store: StoreArgs,
        /// Whose entries: ingest, features, inference, results, or review.
        #[arg(long)]
        stage: Letters,
        #[command(flatten)]
        filter: FilterArgs,
        /// The most entries to delete.
        #[arg(long)]
        limit: Option<usize>,
        /// Do not ask.
        #[arg(long)]
        yes: bool,
        /// What was deleted, as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Which entries: every option narrows the set.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct FilterArgs {
    /// Reason code (e.g. `missing_features`, `below_threshold`).
    #[arg(long)]
    pub reason: Option<String>,
    /// Record ids matching this glob (`digits-*-00??-*`): `*`, `?` and `[...]` are wildcards, so
    /// an id holding one of them is matched by itself in brackets (`rec[[]1]` for `rec[1]`).
    #[arg(long)]
    pub record_id: Option<String>,
    /// Predicted class (review items).
    #[arg(long)]
    pub class: Option<String>,
    /// Confidence at least this (0 to 1; review items).
    #[arg(long, value_parser = parse_confidence)]
    pub min_confidence: Option<f32>,
    /// Confidence at most this (0 to 1; review items).
    #[arg(long, value_parser = parse_confidence)]
    pub max_confidence: Option<f32>,
    /// Last failed at or after: RFC 3339 (`2026-11-26T09:00:00Z`) or an age (`2h`, `30m`).
    #[arg(long)]
    pub since: Option<String>,
    /// Last failed before: RFC 3339 or an age.
    #[arg(long)]
    pub until: Option<String>,
    /// Only entries whose body is a queue's unreadable stored batch, not a record (embedded
    /// store, damaged: docs/operations.md).
    #[arg(long)]
    pub stored_batches: bool,
}

impl FilterArgs {
    /// The filter for entries of `stage`, refusing what could only match nothing there (a review
    /// item's class or confidence asked of a stage DLQ, a confidence range that is empty).
    pub fn filter(&self, stage: Letters) -> anyhow::Result<Filter> {
        if stage != Letters::Review
            && (self.class.is_some() || self.min_confidence.is_some() || self.max_confidence.is_some())
        {
            bail!("--class, --min-confidence and --max-confidence are a review item's: use --stage review");
        }
        if let (Some(min), Some(max)) = (self.min_confidence, self.max_confidence)
            && min > max
        {
            bail!("--min-confidence {min} is above --max-confidence {max}: no entry lies between");
        }
        let since_ms = self.since.as_deref().map(parse_time).transpose()?;
        let until_ms = self.until.as_deref().map(parse_time).transpose()?;
        if let (Some(since), Some(until)) = (since_ms, until_ms)
            && since >= until
        {
            bail!(
                "--since is not before --until: no entry lies between (an age counts back from now: --since 3h --until 2h)"
            );
        }
        Ok(Filter {
            reason: self.reason.as_deref().map(parse_reason).transpose()?,
            record_id: self
                .record_id
                .as_deref()
                .map(|p| glob::Pattern::new(p).with_context(|| format!("--record-id {p:?} is not a glob")))
                .transpose()?,
            class: self.class.clone(),
            min_confidence: self.min_confidence,
            max_confidence: self.max_confidence,
            since_ms,
            until_ms,
            stored_batches: self.stored_batches,
        })
    }
}

pub fn parse_reason(raw: &str) -> anyhow::Result<ReasonCode> {
    serde_json::from_value(serde_json::Value::String(raw.to_owned()))
        .with_context(|| format!("{raw:?} is not a reason code (they are listed in docs/operations.md)"))
}

/// Milliseconds since the epoch of an RFC 3339 time, or of now less an age (`90s`, `2h`, `3d`).
pub fn parse_time(raw: &str) -> anyhow::Result<u64> {
    // A bare number short of a time in milliseconds is an age whose unit was left out (`30`):
    // read as milliseconds, it would reach back to 1970, and a purge take everything.
    let digits = raw.trim();
    if !digits.is_empty() && digits.len() < 12 && digits.bytes().all(|b| b.is_ascii_digit()) {
        bail!("{raw:?}: give an age a unit (30m, 2h) or a time in milliseconds since the epoch (13 digits)");
    }
    sluice_core::envelope::parse_time(raw).map_err(anyhow::Error::msg)
}

/// A rate given on the command line: a number above 0 (none means as fast as it goes).
pub fn parse_rate(raw: &str) -> Result<f64, String> {
    match raw.parse::<f64>() {
        Ok(rate) if rate > 0.0 && rate.is_finite() => Ok(rate),
        _ => Err(format!("{raw:?} is no rate: give a number above 0, or leave --rate out for no limit")),
    }
}

/// A confidence given on the command line: a number from 0 to 1.
pub fn parse_confidence(raw: &str) -> Result<f32, String> {
    let value: f32 = raw.parse().map_err(|_| format!("{raw:?} is not a number"))?;
    if !(0.0..=1.0).contains(&value) {
        return Err(format!("{value} is no confidence: one lies from 0 to 1"));
    }
    Ok(value)
}

pub async fn run(command: DlqCommand, settings: Settings) -> anyhow::Result<()> {
    // Ctrl-C while entries are held (on SQS a look hides what it reads) gives them back first.
    sluice_core::shutdown::interrupt_on_signal();
    let open = |store: &StoreArgs| {
        let settings = store.apply(settings.clone());
        async move { anyhow::Ok((Backend::open_observer(&settings.store()?).await?, settings)) }
    };
    match command {
        DlqCommand::List { store, stage, filter, limit, json } => {
            let (backend, _) = open(&store).await?;
            let (items, held) = matching(&backend, stage, &filter.filter(stage)?).await?;
            for item in items.iter().take(limit) {
                print_line(item, json)?;
            }
            if items.is_empty() && held.is_none() {
                eprintln!("no {stage} entries match");
            } else if items.len() > limit || held.is_some() {
                let of = among(held);
                let total = items.len() as u64;
                eprintln!(
                    "{} of {total} {} that match{of}; --limit N lists more",
                    limit.min(items.len()),
                    entries(total)
                );
            }
        }
        DlqCommand::Show { store, id, stage, json } => {
            let (backend, _) = open(&store).await?;
            let item = dlq::show(&backend, stage, &id).await;
            not_interrupted()?;
            let item = item?.with_context(|| format!("no entry for {id}"))?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&item)?)?;
            } else {
                out!("{}", describe(&item))?;
            }
        }
        DlqCommand::Stats { store, json } => {
            let (backend, _) = open(&store).await?;
            let stats = dlq::stats(&backend).await?;
            not_interrupted()?;
            if json {
                outln!("{}", serde_json::to_string(&stats)?)?;
            } else {
                for queue in stats {
                    let age = queue
                        .oldest_age_ms
                        .map(|ms| format!(", oldest {}", humantime::format_duration(Duration::from_secs(ms / 1000))))
                        .unwrap_or_default();
                    let copies = queue.entries - queue.records;
                    let copies = match copies {
                        0 => String::new(),
                        1 => " (1 a copy of another's record)".to_owned(),
                        n => format!(" ({n} copies of others' records)"),
                    };
                    let of = among(queue.partial.then_some(queue.depth));
                    // On SQS a look sees what is visible: entries another reader holds are not
                    // counted, and "0 entries" alone would read as an empty queue.
                    let held = match queue.depth.saturating_sub(queue.entries) {
                        0 => String::new(),
                        _ if queue.partial => String::new(),
                        n => format!(
                            " ({n} more held by a reader now, back when it lets go or its visibility timeout ends)"
                        ),
                    };
                    outln!(
                        "{:<10} {:>7} {}{of}{held}{copies}{age}",
                        queue.queue.as_str(),
                        queue.entries,
                        entries(queue.entries)
                    )?;
                    for (reason, n) in queue.by_reason {
                        outln!("  {reason:<28} {n:>7}")?;
                    }
                }
            }
        }
        DlqCommand::Replay { store, stage, filter, to, dry_run, limit, rate, json } => {
            let (backend, settings) = open(&store).await?;
            let filter = filter.filter(stage)?;
            let target = match stage {
                Letters::Review if to.is_some() => bail!(
                    "review items are judged again where they are, under the bundle's thresholds: --to does not apply"
                ),
                Letters::Review => None,
                Letters::Stage(failed) => Some(dlq::replay_target(failed, to).map_err(anyhow::Error::msg)?),
            };
            if dry_run {
                let (items, held) = matching(&backend, stage, &filter).await?;
                let mut stale = 0;
                let (mut items, left): (Vec<_>, Vec<_>) = match target {
                    None => {
                        let rejudge = Rejudge(ModelBundle::load(settings.model()?.dir)?.manifest);
                        let fates = rejudge.preview(&backend, &items).await?;
                        let (mut done, mut kept) = (Vec::new(), Vec::new());
                        for (item, fate) in items.into_iter().zip(fates) {
                            match fate {
                                Fate::Done => done.push(item),
                                Fate::Kept => kept.push(item),
                                Fate::Stale => stale += 1,
                            }
                        }
                        (done, kept)
                    }
                    Some(target) => items.into_iter().partition(|i| SendTo(target).sends(i)),
                };
                items.truncate(limit.unwrap_or(usize::MAX));
                for item in &items {
                    print_line(item, json)?;
                }
                let of = among(short(held, items.len(), limit));
                if stage == Letters::Review {
                    let stale = settled_before(stale, ", ", "would be taken off");
                    eprintln!(
                        "dry run: {} review items{of} would be accepted under the current thresholds, {} stay \
                         in review{stale}; nothing moved",
                        items.len(),
                        left.len()
                    );
                } else {
                    eprintln!(
                        "dry run: {} {}{of} would be replayed from {stage}; nothing moved",
                        items.len(),
                        entries(items.len() as u64)
                    );
                    if !left.is_empty() {
                        eprintln!("{}", not_replayable(left.len()));
                    }
                }
                return Ok(());
            }
            let options = ReplayOptions { to, limit, rate, ..ReplayOptions::default() };
            let progress = crate::progress::counter("entries replayed");
            let so_far = AtomicU64::new(0);
            let report = |n: u64| {
                so_far.store(n, Ordering::Relaxed);
                progress.set_position(n);
            };
            let moved = match target {
                None => {
                    let manifest = ModelBundle::load(settings.model()?.dir)?.manifest;
                    dlq::apply(&backend, stage, &filter, &Rejudge(manifest), &options, &report).await
                }
                Some(target) => dlq::apply(&backend, stage, &filter, &SendTo(target), &options, &report).await,
            };
            progress.finish_and_clear();
            let done = if stage == Letters::Review { "accepted" } else { "replayed" };
            let moved = before_the_error(moved, &so_far, done)?;
            if json {
                outln!("{}", serde_json::to_string(&moved)?)?;
            } else if stage == Letters::Review {
                let stale = settled_before(moved.stale, "; ", "taken off");
                outln!(
                    "{} review items accepted under the current thresholds; {} stay in review{stale}",
                    moved.moved,
                    moved.kept
                )?;
            } else {
                outln!(
                    "replayed {} {} from the {stage} DLQ to {}",
                    moved.moved,
                    entries(moved.moved),
                    target.unwrap_or(stage.stage())
                )?;
                if moved.kept > 0 {
                    eprintln!("{}", not_replayable(moved.kept as usize));
                }
            }
            stopped_early()?;
        }
        DlqCommand::Purge { store, stage, filter, limit, yes, json } => {
            let (backend, _) = open(&store).await?;
            let filter = filter.filter(stage)?;
            // What arrives while the question waits is not the purge's to take.
            let asked_ms = sluice_core::envelope::now_ms();
            if !yes {
                let (items, held) = matching(&backend, stage, &filter).await?;
                let n = items.len().min(limit.unwrap_or(usize::MAX));
                let question = match short(held, n, limit) {
                    Some(held) => format!(
                        "delete the entries that match from {stage} for good? {n} do in what one look read of its \
                         {held} messages, and the purge goes on through the rest{}",
                        limit.map(|l| format!(" (up to {l} in all)")).unwrap_or_default()
                    ),
                    None => format!("delete {n} {} from {stage} for good?", entries(n as u64)),
                };
                if !confirm(&question)? {
                    bail!("nothing deleted");
                }
            }
            let options = ReplayOptions { limit, sent_before_ms: Some(asked_ms), ..ReplayOptions::default() };
            let so_far = AtomicU64::new(0);
            let report = |n: u64| so_far.store(n, Ordering::Relaxed);
            let deleted = dlq::apply(&backend, stage, &filter, &Delete, &options, &report).await;
            let deleted = before_the_error(deleted, &so_far, "deleted")?;
            if json {
                outln!("{}", serde_json::json!({ "deleted": deleted.moved }))?;
            } else {
                outln!("deleted {} {} from {stage}", deleted.moved, entries(deleted.moved))?;
            }
            stopped_early()?;
        }
    }
    Ok(())
}

/// The entries of `stage` that match `filter`, from one look, and how many messages the queue
/// holds where the look saw part of it only (see [`dlq::Look`]).
async fn matching(backend: &Backend, stage: Letters, filter: &Filter) -> anyhow::Result<(Vec<Item>, Option<u64>)> {
    let look = dlq::look(backend, stage, filter).await?;
    not_interrupted()?;
    Ok((look.items, look.partial.then_some(look.depth)))
}

fn entries(n: u64) -> &'static str {
    if n == 1 { "entry" } else { "entries" }
}

/// What a review replay says of the `n` items whose results were settled before it (none: nothing).
fn settled_before(n: u64, separator: &str, done: &str) -> String {
    match n {
        0 => String::new(),
        1 => format!("{separator}1 item of a result settled before {done}"),
        n => format!("{separator}{n} items of results settled before {done}"),
    }
}

/// Stopped by Ctrl-C, a look has read part of the queue: nothing of it is shown as if whole.
fn not_interrupted() -> anyhow::Result<()> {
    if sluice_core::shutdown::interrupted() {
        bail!("interrupted: nothing changed, and the entries read are visible again");
    }
    Ok(())
}

/// A replay's or purge's outcome; failed part way, what it had `done` is said before the error
/// (those entries are where it sent them, or gone; the rest stay).
fn before_the_error(
    outcome: sluice_core::Result<dlq::Moved>,
    so_far: &AtomicU64,
    done: &str,
) -> anyhow::Result<dlq::Moved> {
    outcome.map_err(|error| {
        let n = so_far.load(Ordering::Relaxed);
        if n > 0 {
            eprintln!("{done} {n} {} before this error; the rest stay where they were", entries(n));
        }
        error.into()
    })
}

/// Stopped by Ctrl-C, a replay or purge has done what it says and left the rest.
fn stopped_early() -> anyhow::Result<()> {
    if sluice_core::shutdown::interrupted() {
        bail!("interrupted: the entries not reached stay where they were (run it again to go on)");
    }
    Ok(())
}

/// `held`, where a count `n` of entries that match (at most `limit`) may fall short of what the
/// queue holds: the look saw part of it and the limit was not reached.
fn short(held: Option<u64>, n: usize, limit: Option<usize>) -> Option<u64> {
    held.filter(|_| limit.is_none_or(|limit| n < limit))
}

/// What a count of entries says where one look saw part of the queue only (`held`, the
/// messages it holds).
fn among(held: Option<u64>) -> String {
    held.map(|held| format!(" (counted in what one look read of the {held} messages in the queue)")).unwrap_or_default()
}

/// What a replay says of the `n` entries it leaves.
fn not_replayable(n: usize) -> String {
    format!(
        "{n} entries left where they are: no stage can read them again. A record a reviewer rejected \
         (rejected_in_review) has ended; a queue's unreadable stored batch (--stored-batches) is no record \
         at all; an ingest record too large for a stream record under its replay key (over 1 MiB) cannot be \
         written back; an entry under a reason this build does not know (unrecognised) is a newer build's, \
         for that build to replay (docs/operations.md). Keep what matters of them, then purge them."
    )
}

fn print_line(item: &Item, json: bool) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string(item)?)?;
    } else {
        let id = item.record_id().map_or("-", |id| id.as_str());
        let verdict = item.verdict.as_ref().map(|v| format!("\t{} {:.4}", v.label, v.confidence)).unwrap_or_default();
        // One line an entry, whatever a decoder's message held.
        let detail = item.entry.detail.split_whitespace().collect::<Vec<_>>().join(" ");
        writeln!(out, "{id}\t{}\tattempts={}\t{detail}{verdict}", item.entry.reason, item.entry.attempts)?;
    }
    Ok(())
}

/// One entry, for people.
pub fn describe(item: &Item) -> String {
    let e = &item.entry;
    let time = |ms: u64| humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string();
    let mut out = format!(
        "record        {}\nqueue         {}\nstage         {}\nreason        {}\ndetail        {}\nattempts      {}\nfirst failed  {}\nlast failed   {}\n",
        item.record_id().map_or("-", |id| id.as_str()),
        item.queue,
        e.stage,
        e.reason,
        e.detail,
        e.attempts,
        time(e.first_failure_ms),
        time(e.last_failure_ms),
    );
    for (key, value) in &item.attributes {
        out.push_str(&format!("attribute     {key} = {value}\n"));
    }
    if let Some(v) = &item.verdict {
        out.push_str(&format!("class         {} ({:.4})\nprobabilities", v.label, v.confidence));
        for p in &v.probabilities {
            out.push_str(&format!(" {p:.3}"));
        }
        out.push('\n');
    }
    out
}

/// Asks `question` on the terminal; without one, refuses (the caller's `--yes` says yes).
pub fn confirm(question: &str) -> anyhow::Result<bool> {
    if !std::io::stdin().is_terminal() {
        bail!("{question} Pass --yes to confirm without a terminal");
    }
    eprint!("{question} [y/N] ");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}

#[cfg(test)]
mod tests {
    use sluice_core::topology::StageName;

    use super::*;

    /// `--since 30` (its unit left out) is refused: read as milliseconds it would mean 1970, and
    /// a purge would take everything. A time in milliseconds, an RFC 3339 time and an age read.
    #[test]
    fn a_bare_number_short_of_a_time_is_refused() {
        for bare in ["30", "0", " 7 "] {
            let err = parse_time(bare).unwrap_err().to_string();
            assert!(err.contains("give an age a unit"), "{bare:?}: {err}");
        }
        assert_eq!(parse_time("1796686941493").unwrap(), 1_796_686_941_493);
        assert!(parse_time("2h").is_ok() && parse_time("2026-11-26T09:00:00Z").is_ok());
    }

    #[test]
    fn a_filter_that_could_match_nothing_is_refused() {
        let review = FilterArgs { class: Some("7".into()), ..FilterArgs::default() };
        assert!(review.filter(Letters::Review).is_ok());
        let err = review.filter(Letters::Stage(StageName::Ingest)).unwrap_err().to_string();
        assert!(err.contains("use --stage review"), "{err}");
        let empty = FilterArgs { min_confidence: Some(0.9), max_confidence: Some(0.2), ..FilterArgs::default() };
        assert!(empty.filter(Letters::Review).unwrap_err().to_string().contains("above --max-confidence"));
        let reversed = FilterArgs { since: Some("2h".into()), until: Some("3h".into()), ..FilterArgs::default() };
        assert!(reversed.filter(Letters::Review).unwrap_err().to_string().contains("--since is not before --until"));
        let window = FilterArgs { since: Some("3h".into()), until: Some("2h".into()), ..FilterArgs::default() };
        assert!(window.filter(Letters::Review).is_ok());
        assert!(parse_rate("0").is_err() && parse_rate("-1").is_err() && parse_rate("inf").is_err());
        assert_eq!(parse_rate("2.5"), Ok(2.5));
    }
}
