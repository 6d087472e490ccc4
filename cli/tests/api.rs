//! The results and review HTTP API (`sluice-api`) over a demo run's store: it answers what its
//! OpenAPI document says, pages through results, takes a reviewer's label once, and turns bad
//! input into 4xx with a message. Then schemathesis (from PyPI) throws generated requests at
//! every operation, valid and not, and finds no 5xx and no answer outside the document.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{bin, demo_summary, model_dir, test_env};
use sluice_core::telemetry::health::fetch;
use sluice_core::testing::{SETUP_HINT, free_port};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Api {
    child: Child,
    address: SocketAddr,
}

impl Drop for Api {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `sluice-api` on `store` without waiting for it to answer.
fn spawn_api(store: &str) -> Api {
    let address = SocketAddr::from(([127, 0, 0, 1], free_port().unwrap()));
    let child = test_env(&mut Command::new(bin("sluice-api")))
        .args(["--store", store, "--port", &address.port().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Api { child, address }
}

async fn start_api(store: &str) -> Api {
    let api = spawn_api(store);
    let address = api.address;
    let deadline = Instant::now() + Duration::from_secs(30);
    while fetch(address, "/openapi.json").await.is_err() {
        assert!(Instant::now() < deadline, "sluice-api did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    api
}

/// GET `path`: status and JSON body.
async fn get(api: &Api, path: &str) -> (u16, serde_json::Value) {
    let (status, body) = fetch(api.address, path).await.unwrap();
    (status, serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}")))
}

/// POST `body` to `path` as `content_type`: status and JSON body.
async fn post(api: &Api, path: &str, content_type: &str, body: &[u8]) -> (u16, serde_json::Value) {
    let mut stream = tokio::net::TcpStream::connect(api.address).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.0\r\nHost: {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        api.address,
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let _ = stream.write_all(body).await;
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response).await;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_str(body).unwrap_or_else(|e| panic!("{path}: {e}: {body}")))
}

/// Started before the workers have made their store, the API waits for it rather than stop (as an
/// operator's `sluice serve` beside `sluice run` would be).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_started_before_its_store_waits_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("later.sqlite").to_str().unwrap().to_owned();
    let mut api = spawn_api(&store);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(api.child.try_wait().unwrap().is_none(), "sluice-api stopped while the store was not there");
    assert!(!std::path::Path::new(&store).exists(), "the API made a store of its own");

    let produced = test_env(&mut Command::new(bin("sluice")))
        .args(["produce", "--store", &store, "--digits", "test", "--limit", "3"])
        .output()
        .unwrap();
    assert!(produced.status.success(), "{}", String::from_utf8_lossy(&produced.stderr));
    let deadline = Instant::now() + Duration::from_secs(30);
    while fetch(api.address, "/openapi.json").await.is_err() {
        assert!(Instant::now() < deadline, "sluice-api did not start once the store was made");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, page) = get(&api, "/results").await;
    assert_eq!(status, 200, "{page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_answers_as_its_document_says() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("api.sqlite").to_str().unwrap().to_owned();
    let demo = demo_summary(test_env(&mut Command::new(bin("sluice"))).args(["demo", "--json", "--store", &store]));
    let api = start_api(&store).await;

    let (status, document) = get(&api, "/openapi.json").await;
    assert_eq!(status, 200);
    assert_eq!(document["openapi"], "3.0.3");

    // A request naming a host the API was not told it goes by is refused (a page that rebinds
    // its own name to 127.0.0.1, read through a reviewer's browser); addresses and localhost
    // are answered.
    for (host, want) in [("rebound.example", "421"), ("rebound.example:9105", "421"), ("localhost:1", "200")] {
        let mut stream = tokio::net::TcpStream::connect(api.address).await.unwrap();
        let head = format!("GET /results?limit=1 HTTP/1.0\r\nHost: {host}\r\n\r\n");
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        assert_eq!(response.split_whitespace().nth(1), Some(want), "{host}: {response}");
    }

    // Every result, two pages at a time, none twice.
    let total = demo["results"].as_u64().unwrap() + demo["review"].as_u64().unwrap();
    let (mut seen, mut path) = (std::collections::BTreeSet::new(), "/results?limit=100".to_owned());
    loop {
        let (status, page) = get(&api, &path).await;
        assert_eq!(status, 200, "{page}");
        for result in page["results"].as_array().unwrap() {
            assert!(seen.insert(result["record_id"].as_str().unwrap().to_owned()), "a result on two pages");
        }
        match page["next_page_token"].as_str() {
            // Written as it came: a token is URL-safe.
            Some(token) => path = format!("/results?limit=100&page_token={token}"),
            None => break,
        }
    }
    assert_eq!(seen.len() as u64, total);
    let (_, sevens) = get(&api, "/results?class=7&status=accepted&limit=1000").await;
    let sevens: std::collections::BTreeSet<String> = sevens["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert!(r["label"] == "7" && r["status"] == "accepted", "{r}");
            r["record_id"].as_str().unwrap().to_owned()
        })
        .collect();
    let (_, accepted) = get(&api, "/results?status=accepted&limit=1000").await;
    let expected: std::collections::BTreeSet<String> = accepted["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["label"] == "7")
        .map(|r| r["record_id"].as_str().unwrap().to_owned())
        .collect();
    assert!(!expected.is_empty(), "the demo accepts some sevens");
    assert_eq!(sevens, expected, "every accepted seven, and only those");

    // One result; a reviewer's label, taken once.
    let (status, review) = get(&api, "/review?limit=10").await;
    assert_eq!(status, 200);
    let waiting = review["results"].as_array().unwrap();
    assert_eq!(waiting.len() as u64, demo["review"].as_u64().unwrap());
    let id = waiting[0]["record_id"].as_str().unwrap();
    let (status, one) = get(&api, &format!("/results/{id}")).await;
    assert_eq!((status, one["status"].as_str()), (200, Some("review")));
    // A wrong method is answered in JSON, as every other refusal.
    let (status, wrong) = get(&api, &format!("/review/{id}")).await;
    assert_eq!(status, 405);
    assert!(wrong["error"].as_str().is_some_and(|e| e.contains("another method")), "{wrong}");
    let (status, labelled) = post(&api, &format!("/review/{id}"), "application/json", br#"{"label":"4"}"#).await;
    assert_eq!(status, 200, "{labelled}");
    assert_eq!((labelled["status"].as_str(), labelled["reviewed_label"].as_str()), (Some("reviewed"), Some("4")));
    let (status, again) = post(&api, &format!("/review/{id}"), "application/json", br#"{"label":"5"}"#).await;
    assert_eq!(status, 409, "{again}");

    // Bad input: 4xx with a message, never a 5xx.
    for (path, want) in [
        ("/results?colour=red", 400),
        ("/results?limit=0", 400),
        ("/results?status=maybe", 400),
        ("/results?min_confidence=2", 400),
        ("/results?page_token=nonsense", 400),
        ("/results/no%20such%20id", 400),
        ("/results/never-produced", 404),
        ("/nowhere", 404),
    ] {
        let (status, body) = get(&api, path).await;
        assert_eq!(status, want, "{path}: {body}");
        assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()), "{path}: {body}");
    }
    let other = waiting[1]["record_id"].as_str().unwrap();
    for (content_type, body, want) in [
        ("application/json", &br#"{"label":"not-a-digit"}"#[..], 400),
        ("application/json", br#"{"label":"4","extra":1}"#, 422),
        ("application/json", b"{", 400),
        ("text/plain", br#"{"label":"4"}"#, 415),
        ("application/json", &[b' '; 8 * 1024], 413),
    ] {
        let (status, answer) = post(&api, &format!("/review/{other}"), content_type, body).await;
        assert_eq!(status, want, "{content_type} {}: {answer}", String::from_utf8_lossy(&body[..body.len().min(40)]));
        assert!(answer["error"].as_str().is_some(), "{answer}");
    }

    // Generated requests against the document: every check, a fixed seed, one worker (the same
    // requests each run), from the scratch directory (it writes caches where it runs).
    let schemathesis = std::env::var("SLUICE_SCHEMATHESIS")
        .unwrap_or_else(|_| panic!("the API test runs schemathesis: {SETUP_HINT}, or set SLUICE_SCHEMATHESIS"));
    let run = Command::new(schemathesis)
        .current_dir(dir.path())
        .args(["run", &format!("http://{}/openapi.json", api.address), "--url", &format!("http://{}", api.address)])
        .args(["--checks", "all", "--max-examples", "25", "--seed", "1", "--workers", "1"])
        .args(["--generation-database", "none", "--no-color"])
        .env("SLUICE__MODEL__DIR", model_dir())
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "schemathesis found problems:\n{}\n{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
}
