//! `sluice results [get ID | list]`: stored predictions (the work is the result store's query).

use anyhow::Context;
use sluice_core::backend::{Backend, PageToken, ResultQuery};
use sluice_core::config::{Settings, StoreArgs};
use sluice_core::envelope::RecordId;
use sluice_core::record::{PredictionResult, ResultStatus};
use std::io::Write as _;

/// The store's flags go before or after the subcommand (`sluice results --backend aws get ID`
/// or `sluice results get ID --backend aws`); without a subcommand, the flags are `list`'s.
#[derive(Debug, clap::Args)]
pub struct ResultsArgs {
    #[command(subcommand)]
    pub command: Option<ResultsCommand>,
    #[command(flatten)]
    pub store: StoreArgs,
    /// Without a subcommand: `list`.
    #[command(flatten)]
    pub list: ListArgs,
}

#[derive(Debug, clap::Subcommand)]
pub enum ResultsCommand {
    /// One record's result.
    Get {
        #[command(flatten)]
        store: StoreArgs,
        id: String,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Results in the order they were stored, a page at a time.
    List {
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        list: ListArgs,
    },
}

#[derive(Debug, Clone, Default, PartialEq, clap::Args)]
pub struct ListArgs {
    /// accepted, review (waiting for a person), reviewed, or rejected (records a reviewer sent to
    /// the results DLQ: listed only when asked for).
    #[arg(long)]
    pub status: Option<String>,
    /// The predicted class.
    #[arg(long)]
    pub class: Option<String>,
    /// Stored at or after: RFC 3339 or an age (`2h`).
    #[arg(long)]
    pub since: Option<String>,
    /// Confidence at least this (0 to 1).
    #[arg(long, value_parser = crate::dlq::parse_confidence)]
    pub min_confidence: Option<f32>,
    /// Confidence at most this (0 to 1).
    #[arg(long, value_parser = crate::dlq::parse_confidence)]
    pub max_confidence: Option<f32>,
    /// The most results on a page [default: 20].
    #[arg(long)]
    pub limit: Option<usize>,
    /// Where the previous page ended (printed after it).
    #[arg(long)]
    pub page_token: Option<String>,
    /// One JSON object a line.
    #[arg(long)]
    pub json: bool,
}

impl ListArgs {
    fn query(&self) -> anyhow::Result<ResultQuery> {
        Ok(ResultQuery {
            status: self
                .status
                .as_deref()
                .map(|s| {
                    ResultStatus::parse(s)
                        .with_context(|| format!("unknown status {s:?}: accepted, review, reviewed or rejected"))
                })
                .transpose()?,
            class: self.class.clone(),
            since_ms: self.since.as_deref().map(crate::dlq::parse_time).transpose()?,
            min_confidence: self.min_confidence,
            max_confidence: self.max_confidence,
            limit: self.limit.unwrap_or(20).max(1),
            page_token: self.page_token.as_deref().map(PageToken::parse).transpose()?,
            examine_at_most: None,
        })
    }
}

fn print(result: &PredictionResult, json: bool) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string(result)?)?;
    } else {
        let reviewed = result.reviewed_label.as_ref().map(|l| format!("\treviewed as {l}")).unwrap_or_default();
        // Escaped: a tab or a line break in a producer's attribute would break the line into others.
        let attributes: String = result
            .attributes
            .iter()
            .map(|(name, value)| format!("\t{}={}", name.escape_debug(), value.escape_debug()))
            .collect();
        writeln!(
            out,
            "{}\t{}\t{:.4}\t{}\t{}{reviewed}{attributes}",
            result.record_id,
            result.label,
            result.confidence,
            result.status.as_str(),
            result.backend
        )?;
    }
    Ok(())
}

pub async fn run(args: ResultsArgs, settings: Settings) -> anyhow::Result<()> {
    let settings = args.store.apply(settings);
    let open = |store: &StoreArgs| {
        let store = store.apply(settings.clone()).store();
        async move { anyhow::Ok(Backend::open_observer(&store?).await?) }
    };
    match args.command {
        None => list(&open(&StoreArgs::default()).await?, &args.list).await?,
        // `--json` is get's flag too; the others only the listing's.
        Some(_) if (ListArgs { json: false, ..args.list.clone() }) != ListArgs::default() => {
            anyhow::bail!("the listing's flags go after `list` (sluice results list --status review), or without it")
        }
        Some(ResultsCommand::Get { store, id, json }) => {
            let id = RecordId::parse(id)?;
            let mut found = open(&store).await?.results.get_batch(std::slice::from_ref(&id)).await?;
            print(&found.remove(&id).with_context(|| format!("no result for {id}"))?, json || args.list.json)?;
        }
        Some(ResultsCommand::List { store, list: mut listing }) => {
            listing.json |= args.list.json;
            list(&open(&store).await?, &listing).await?
        }
    }
    Ok(())
}

/// `text` as one word for a POSIX shell, which a record id may need: it may hold a `'`.
fn shell_quoted(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

async fn list(backend: &Backend, list: &ListArgs) -> anyhow::Result<()> {
    let page = backend.results.query(&list.query()?).await?;
    for result in &page.results {
        print(result, list.json)?;
    }
    if let Some(token) = page.next_page_token {
        eprintln!("more: --page-token {}", shell_quoted(&token.to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_token_is_one_word_for_the_shell() {
        assert_eq!(shell_quoted("1796598588724#a"), "'1796598588724#a'");
        let quoted = shell_quoted("1796598588724#it's");
        let echoed = std::process::Command::new("sh").arg("-c").arg(format!("printf %s {quoted}")).output().unwrap();
        assert_eq!(String::from_utf8(echoed.stdout).unwrap(), "1796598588724#it's");
    }
}
