//! `sluice review`: a person walks the review queue in a terminal and says what each item is.
//!
//! Each item shows its record, the model's top classes and the image (drawn with half-block
//! characters, two pixels a cell, or saved as PNG with `--save`), rebuilt from the record's
//! feature vector; a JSON event shows its fields as the model saw them too. A label settles the result (status `reviewed`, the person's label beside the
//! model's) and takes the item off the review queue; `d` sends it to the results DLQ instead
//! (not fit for a result: its result is taken away); `s` skips it (it stays for later), `q`
//! quits. `sluice review --label ID LABEL` and `--reject ID` do the same for one item without a
//! terminal.

use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use sluice_core::backend::{Backend, Receipt, ReviewOutcome};
use sluice_core::config::StoreArgs;
use sluice_core::dlq::{self, Action, Fate, Item, Letters, Reject};
use sluice_core::envelope::RecordId;
use sluice_core::model::ModelManifest;
use sluice_core::record::{Resolution, ResultStatus};
use sluice_core::topology::QueueName;
use sluice_core::vector::FeatureVector;

#[derive(Debug, Clone, clap::Args)]
pub struct ReviewArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// Settle one item without a terminal: its record id and the true label.
    #[arg(long, num_args = 2, value_names = ["ID", "LABEL"])]
    pub label: Option<Vec<String>>,
    /// Send one item to the results DLQ without a terminal (not fit for a result): its record id.
    #[arg(long, value_name = "ID", conflicts_with = "label")]
    pub reject: Option<String>,
    /// Save each item's image as `<record id>.png` here instead of drawing it.
    #[arg(long)]
    pub save: Option<PathBuf>,
}

/// How long an item being looked at stays hidden from other reviewers.
const LOOKING: Duration = Duration::from_secs(600);
/// The widest a line of a JSON event's fields is written, in characters.
const FIELDS_WIDTH: usize = 100;

/// The widest an image is drawn, in terminal cells.
const MAX_WIDTH: u32 = 56;

/// Settles `id` with `label`, whether or not its review item is still in the queue.
pub async fn label_one(backend: &Backend, manifest: &ModelManifest, id: &str, label: &str) -> anyhow::Result<String> {
    check_label(manifest, label)?;
    Ok(match dlq::label(backend, &RecordId::parse(id)?, label).await? {
        ReviewOutcome::Resolved(_) => format!("{id}: reviewed as {label}"),
        // As the API's 409: the first label stands, and this one changed nothing.
        ReviewOutcome::NotWaiting(r) => bail!(
            "{id} is not waiting for review (status {}{}); nothing changed",
            r.status.as_str(),
            r.reviewed_label.map(|l| format!(", labelled {l}")).unwrap_or_default()
        ),
        ReviewOutcome::Missing => bail!("no result for {id}"),
    })
}

/// Sends `id` to the results DLQ instead of labelling it.
pub async fn reject_one(backend: &Backend, id: &str) -> anyhow::Result<String> {
    Ok(match dlq::reject(backend, &RecordId::parse(id)?).await? {
        dlq::Rejected::Rejected => format!("{id}: sent to the results DLQ (rejected_in_review)"),
        // As `--label` says it: a script sees that nothing happened.
        dlq::Rejected::NotWaiting(r) => {
            bail!("{id} is not waiting for review (status {}); nothing changed", r.status.as_str())
        }
        dlq::Rejected::Missing => bail!("no result waiting for review, and no review item, for {id}"),
        dlq::Rejected::Held(n) => bail!(
            "{id}: its review item is not in the queue now, and {n} are held by another reviewer or a look; \
             nothing changed: try again once they are back (a reviewer's within {} s)",
            LOOKING.as_secs()
        ),
    })
}

fn check_label(manifest: &ModelManifest, label: &str) -> anyhow::Result<()> {
    if manifest.labels.iter().any(|l| l == label) {
        Ok(())
    } else {
        bail!("{label:?} is not one of the model's labels: {}", manifest.labels.join(" "))
    }
}

/// The interactive walk through the review queue.
pub async fn walk(backend: &Backend, manifest: &ModelManifest, save: Option<&PathBuf>) -> anyhow::Result<()> {
    if !std::io::stdin().is_terminal() {
        bail!("sluice review needs a terminal; without one, settle one item with --label ID LABEL or --reject ID");
    }
    let queue = backend.queue(QueueName::Review);
    let mut skipped = Vec::new();
    let mut settled = 0;
    // Items for results settled already (a record written twice has an item each copy; a label
    // given elsewhere settles only one): taken off the queue unseen.
    let mut stale = 0;
    // Lines read on a thread of their own, so that Ctrl-C at the prompt is heard: it quits the
    // walk as `q` does, giving back what the walk holds (killed, it would leave them hidden for
    // LOOKING).
    let (send, mut lines) = tokio::sync::mpsc::channel::<std::io::Result<String>>(1);
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            if send.blocking_send(line).is_err() {
                return;
            }
        }
    });
    let _holding = sluice_core::shutdown::Holding::start();
    // The item on screen, held by this walk until it is settled or skipped.
    let mut current: Option<Receipt> = None;
    let walked = async {
    loop {
        current = None;
        if sluice_core::shutdown::interrupted() {
            break;
        }
        let Some(message) = queue.receive_hidden(1, dlq::pass_wait(backend), LOOKING).await?.pop() else {
            let stale = if stale > 0 { format!(", {stale} removed as settled before") } else { String::new() };
            outln!("\nthe review queue is empty ({settled} settled, {} skipped{stale})", skipped.len())?;
            // Those this walk skipped are held by it; any others, by someone else.
            let depth = queue.depth().await.map(|d| d.in_flight).unwrap_or_default();
            let held = depth.saturating_sub(skipped.len() as u64);
            if held > 0 {
                outln!(
                    "{held} more held by another reviewer or a walk cut short: each comes back when its holder lets \
                     go, or within {} s",
                    LOOKING.as_secs()
                )?;
            }
            break;
        };
        let receipt = message.receipt.clone();
        current = Some(receipt.clone());
        let item = Item::from_message(Letters::Review, message);
        if item.record_id().is_none() {
            // No result to review: an unreadable stored batch (docs/operations.md), or a message
            // no results stage wrote. Shown once (its receipt hides all of it), left in place.
            let which = match item.entry.stored_batch {
                Some(_) => "--stored-batches".to_owned(),
                None => format!("--reason {}", item.entry.reason.as_str()),
            };
            outln!(
                "\n── an entry that is no review item ({}: {}); left in the queue: \
                 sluice dlq purge --stage review {which} removes it\n",
                item.entry.reason.as_str(),
                item.entry.detail,
            )?;
            skipped.push(receipt);
            continue;
        }
        if let Some(id) = item.record_id()
            && let Some(result) = backend.results.get_batch(std::slice::from_ref(id)).await?.remove(id)
            && result.status != ResultStatus::Review
        {
            queue.ack(&[receipt]).await?;
            stale += 1;
            continue;
        }
        print!("{}", show(backend, manifest, &item, save).await?);
        let answer = loop {
            print!("label ({}), Enter = the model's, d = to the DLQ, s = skip, q = quit > ", manifest.labels.join(" "));
            std::io::stdout().flush()?;
            let line = tokio::select! {
                line = lines.recv() => line.transpose()?.unwrap_or_else(|| "q".to_owned()),
                () = sluice_core::shutdown::until_interrupted() => {
                    outln!()?;
                    "q".to_owned()
                }
            };
            let line = line.trim().to_owned();
            match line.as_str() {
                "s" | "q" | "d" => break line,
                "" => break item.verdict.as_ref().map(|v| v.label.clone()).unwrap_or_default(),
                label if check_label(manifest, label).is_ok() => break line,
                other => outln!("{other:?} is not a label")?,
            }
        };
        match answer.as_str() {
            "q" => {
                skipped.push(receipt);
                break;
            }
            "s" => skipped.push(receipt),
            "d" => match Reject.apply(backend, std::slice::from_ref(&item)).await?[0] {
                Fate::Done => {
                    queue.ack(&[receipt]).await?;
                    settled += 1;
                    if let Some(id) = item.record_id() {
                        dlq::take_off_copies(backend, id).await?;
                    }
                    outln!("-> sent to the results DLQ\n")?;
                }
                Fate::Stale => {
                    queue.ack(&[receipt]).await?;
                    stale += 1;
                    outln!("-> settled meanwhile by someone else; nothing sent to the DLQ\n")?;
                }
                Fate::Kept => {
                    skipped.push(receipt);
                    outln!("-> no record id to reject; left in the queue\n")?;
                }
            },
            label => {
                let id = item.record_id().context("a review item without a record id")?;
                match backend.results.resolve_review(id, &Resolution::Label(label.to_owned())).await? {
                    ReviewOutcome::Resolved(_) => {
                        queue.ack(&[receipt]).await?;
                        settled += 1;
                        outln!("-> reviewed as {label}\n")?;
                    }
                    // Settled by someone else while it was shown: the first label stands.
                    ReviewOutcome::NotWaiting(r) => {
                        queue.ack(&[receipt]).await?;
                        stale += 1;
                        outln!(
                            "-> settled meanwhile by someone else (status {}{}); this label changed nothing\n",
                            r.status.as_str(),
                            r.reviewed_label.map(|l| format!(", labelled {l}")).unwrap_or_default()
                        )?;
                    }
                    ReviewOutcome::Missing => {
                        skipped.push(receipt);
                        outln!("-> no stored result to settle (a rejection stopped halfway: d finishes it); left in the queue\n")?;
                    }
                }
            }
        }
    }
    Ok::<(), anyhow::Error>(())
    }
    .await;
    // Whatever ended the walk, what it holds goes back: an error would leave it hidden for LOOKING.
    if walked.is_err() {
        skipped.extend(current);
    }
    if !skipped.is_empty()
        && let Err(error) = queue.release(&skipped, Duration::ZERO).await
    {
        walked?;
        return Err(error.into());
    }
    walked?;
    if sluice_core::shutdown::interrupted() {
        bail!("interrupted: the items this walk held are back in the queue");
    }
    Ok(())
}

/// What a reviewer sees of one item.
async fn show(
    backend: &Backend,
    manifest: &ModelManifest,
    item: &Item,
    save: Option<&PathBuf>,
) -> anyhow::Result<String> {
    let id = item.record_id().context("a review item without a record id")?;
    let mut out = format!("\n── {id} ──\n");
    if let Some(verdict) = &item.verdict {
        let mut ranked: Vec<(usize, f32)> = verdict.probabilities.iter().copied().enumerate().collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
        let _ = writeln!(out, "model says {} ({:.1}%)", verdict.label, verdict.confidence * 100.0);
        for (class, p) in ranked.into_iter().take(3) {
            let label = manifest.labels.get(class).map_or("?", String::as_str);
            let _ = writeln!(out, "  {label:<12} {:>5.1}%  {}", p * 100.0, "█".repeat((p * 30.0).round() as usize));
        }
    }
    let vector = backend.features.get_batch(std::slice::from_ref(id)).await?.remove(id).and_then(Result::ok);
    // A JSON event's fields as the model saw them; the picture below is the same vector as the
    // model takes it (every architecture takes an image).
    let fields = match (&vector, &manifest.input.tabular) {
        (Some(FeatureVector::Values(values)), Some(tabular)) => tabular.read_back(values),
        _ => None,
    };
    out.push_str(&field_lines(&fields.unwrap_or_default()));
    let picture = vector.and_then(|v| manifest.input.image.as_ref()?.picture(&v));
    match (picture, save) {
        (Some(picture), Some(dir)) => {
            std::fs::create_dir_all(dir)?;
            let path = dir.join(format!("{id}.png"));
            picture.save(&path).with_context(|| format!("saving {}", path.display()))?;
            let _ = writeln!(out, "image: {}", path.display());
        }
        (Some(picture), None) => out.push_str(&half_blocks(&picture, MAX_WIDTH)),
        (None, _) => out.push_str("(no image: the record's features are gone)\n"),
    }
    Ok(out)
}

/// `name=value` for each field, as many to a line as fit [`FIELDS_WIDTH`].
fn field_lines(fields: &[(&str, String)]) -> String {
    let mut lines: Vec<String> = Vec::new();
    for (name, value) in fields {
        let field = format!("{name}={value}");
        match lines.last_mut() {
            Some(line) if line.len() + 2 + field.len() <= FIELDS_WIDTH => {
                line.push_str("  ");
                line.push_str(&field);
            }
            _ => lines.push(field),
        }
    }
    lines.iter().map(|line| format!("  {line}\n")).collect()
}

/// `img` drawn with "▀": each cell's foreground is the upper pixel, its background the lower
/// one (24-bit colour), scaled down to at most `max_width` cells wide.
pub fn half_blocks(img: &image::RgbImage, max_width: u32) -> String {
    let img = if img.width() > max_width {
        let height = (img.height() * max_width / img.width()).max(1);
        image::imageops::resize(img, max_width, height, image::imageops::FilterType::Triangle)
    } else {
        img.clone()
    };
    let mut out = String::new();
    for y in (0..img.height()).step_by(2) {
        for x in 0..img.width() {
            let top = img.get_pixel(x, y).0;
            let bottom = if y + 1 < img.height() { img.get_pixel(x, y + 1).0 } else { [0, 0, 0] };
            let _ = write!(
                out,
                "\x1b[38;2;{};{};{}m\x1b[48;2;{};{};{}m▀",
                top[0], top[1], top[2], bottom[0], bottom[1], bottom[2]
            );
        }
        out.push_str("\x1b[0m\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_json_events_fields_are_written_as_many_to_a_line_as_fit() {
        assert_eq!(field_lines(&[]), "");
        assert_eq!(field_lines(&[("amount", "12.5".into()), ("country", "fr".into())]), "  amount=12.5  country=fr\n");
        let many: Vec<(&str, String)> = vec![("p00", "0".into()); 30];
        let text = field_lines(&many);
        assert!(text.lines().all(|l| l.len() <= FIELDS_WIDTH + 2) && text.lines().count() == 3, "{text}");
        assert_eq!(text.matches("p00=0").count(), 30);
    }

    #[test]
    fn two_pixel_rows_make_one_line_of_half_blocks() {
        let img = image::RgbImage::from_fn(3, 4, |x, _| image::Rgb([x as u8 * 100, 0, 0]));
        let drawn = half_blocks(&img, 56);
        assert_eq!(drawn.lines().count(), 2);
        assert_eq!(drawn.matches('▀').count(), 6);
        assert!(drawn.contains("\x1b[38;2;200;0;0m\x1b[48;2;200;0;0m▀"));
    }
}
