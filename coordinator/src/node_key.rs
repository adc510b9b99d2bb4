//! `roost-coordinator node-key`: pin, replace or clear the key a coordinator checks a node's
//! reports with when the node's manifest names none (`roost.nodeKey` unset in the flake).

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use roost_common::PublicKey;
use roost_common::wire::v1::http as v1;
use serde_json::Value;

/// Arguments of `node-key`.
#[derive(Debug, Args)]
#[command(after_help = "\
A node's reports are checked with the `node_key` of its manifest (`roost.nodeKey` in the
flake). Without one, the coordinator pins the key of the first report that names its own key
(trust on first use): whoever reports first for a node's name wins. This command lets an
operator decide instead:

  roost-coordinator node-key pi-kitchen --key-file pi-kitchen.pub   pin (or replace) the key
  roost-coordinator node-key pi-kitchen --clear                      forget it: the next
                                                                     report pins its own

Pin a node's key before its first boot to enrol it (README: Enrolment). Reports signed by
any other key are then refused. A key's report sequence numbers keep rising across changes:
a key pinned again later cannot replay its old reports.

Authenticated with the coordinator's admin token (`serve --admin-token-file`), or its upload
token when it has none. Exit status: 0 done, 1 the coordinator refused or could not be
reached, 2 bad usage (no key, unreadable token or key file).")]
pub struct NodeKeyArgs {
    /// The node whose key to pin or clear.
    pub node: roost_common::NodeName,
    /// The coordinator's URL.
    #[arg(
        long,
        env = "ROOST_COORDINATOR",
        default_value = "http://127.0.0.1:8080"
    )]
    pub coordinator: String,
    /// File holding the admin token (or the upload token, for a coordinator without one).
    #[arg(long, value_name = "FILE", env = "ROOST_ADMIN_TOKEN_FILE")]
    pub token_file: PathBuf,
    /// Pin the public key in this file (`NAME:BASE64`, as `roost-agent key` prints it or
    /// `keygen --public-file` writes it).
    #[arg(long, value_name = "PUBLIC_FILE", conflicts_with_all = ["key", "clear"])]
    pub key_file: Option<PathBuf>,
    /// Pin this public key (`NAME:BASE64`).
    #[arg(long, value_name = "NAME:BASE64", conflicts_with = "clear")]
    pub key: Option<PublicKey>,
    /// Clear the pin: the next report that names its own key pins it.
    #[arg(long)]
    pub clear: bool,
    /// Print the coordinator's answer as JSON.
    #[arg(long)]
    pub json: bool,
    /// Extra CA certificate (PEM) to trust for an HTTPS coordinator with a private CA.
    #[arg(long, value_name = "PEM")]
    pub ca_cert: Option<PathBuf>,
}

/// What to do, from the arguments.
fn wanted(args: &NodeKeyArgs) -> anyhow::Result<Option<PublicKey>> {
    match (&args.key_file, &args.key, args.clear) {
        (Some(f), None, false) => {
            Ok(Some(PublicKey::read_file(f).with_context(|| {
                format!("public key file {}", f.display())
            })?))
        }
        (None, Some(k), false) => Ok(Some(k.clone())),
        (None, None, true) => Ok(None),
        _ => anyhow::bail!("say what to do: --key-file FILE, --key NAME:BASE64 or --clear"),
    }
}

/// Runs `node-key`.
pub async fn run(args: NodeKeyArgs) -> u8 {
    let setup = wanted(&args).and_then(|key| {
        let t = std::fs::read_to_string(&args.token_file)
            .with_context(|| format!("token file {}", args.token_file.display()))?;
        let (client, base) =
            crate::status::coordinator_client(&args.coordinator, args.ca_cert.as_deref())?;
        Ok((key, t.trim().to_owned(), client, base))
    });
    let (key, token, client, base) = match setup {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e:#}");
            return crate::exit::USAGE;
        }
    };
    let url = v1::node_key_url(&base, &args.node);
    match call(&client, &url, &token, key.as_ref()).await {
        Ok(answer) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&answer).unwrap_or_default()
                );
            } else {
                print_answer(&args.node, &answer);
            }
            crate::exit::OK
        }
        Err(e) => {
            eprintln!("error: node `{}`: {e:#}", args.node);
            crate::exit::FAILED
        }
    }
}

async fn call(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    key: Option<&PublicKey>,
) -> anyhow::Result<Value> {
    let req = match key {
        Some(k) => client.put(url).json(&serde_json::json!({ "node_key": k })),
        None => client.delete(url),
    };
    let resp = req
        .bearer_auth(token)
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    let json: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    if !status.is_success() {
        let message = json["message"].as_str().unwrap_or(body.trim());
        anyhow::bail!("{url} answered {status}: {message}");
    }
    Ok(json)
}

fn print_answer(node: &roost_common::NodeName, a: &Value) {
    let previous = a["previous"].as_str().unwrap_or("none");
    match a["pinned_key"].as_str() {
        Some(k) => println!("node `{node}`: pinned {k} (before: {previous})"),
        None => println!(
            "node `{node}`: pin cleared (before: {previous}); its next report that names its own key pins it"
        ),
    }
    if let Some(m) = a["manifest_node_key"].as_str() {
        println!(
            "note: node `{node}`'s manifest names node key {m}, which is what its reports are checked with; the pin applies only while a manifest names none"
        );
    }
}
