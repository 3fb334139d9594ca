//! An authentication hook: admit a device whose password is the HMAC-SHA256 (hex) of
//! its client id under a shared secret (the default scheme of RocketMQ-MQTT), so no
//! per-device password has to be stored.
//!
//! ```text
//! cargo run --example auth_hook
//! ```
//!
//! The hook is an actix actor answering [`Authenticate`]; it is registered with
//! `NodeBuilder::authenticate(addr.recipient())`. `tests/extend_examples.rs` connects
//! devices with right and wrong passwords.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use actimq::{Config, Node, NodeHandle};
use actimq_actors::mqtt::hooks::{AuthDecision, Authenticate};
use actix::prelude::*;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The password a device with `client_id` must present.
pub fn password_for(secret: &[u8], client_id: &str) -> String {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(client_id.as_bytes());
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Decode lower- or upper-case hex; `None` for anything else.
fn from_hex(s: &[u8]) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16);
    s.chunks(2)
        .map(|p| Some((digit(p[0])? * 16 + digit(p[1])?) as u8))
        .collect()
}

/// The hook: stateless apart from the secret.
pub struct HmacAuth {
    pub secret: Vec<u8>,
}

impl Actor for HmacAuth {
    type Context = Context<Self>;
}

impl Handler<Authenticate> for HmacAuth {
    type Result = AuthDecision;

    fn handle(&mut self, m: Authenticate, _: &mut Context<Self>) -> AuthDecision {
        // 0x86: Bad User Name or Password (3.1.1: return code 4).
        let Some(given) = m.password.as_deref().and_then(from_hex) else {
            return AuthDecision::Deny(0x86);
        };
        let Ok(mut mac) = HmacSha256::new_from_slice(&self.secret) else {
            return AuthDecision::Deny(0x86);
        };
        mac.update(m.client_id.as_bytes());
        // Constant-time comparison.
        match mac.verify_slice(&given) {
            Ok(()) => AuthDecision::Allow,
            Err(_) => AuthDecision::Deny(0x86),
        }
    }
}

/// Start a node in `dir` whose devices must sign their client id with `secret`.
pub async fn start(dir: &Path, secret: &[u8]) -> anyhow::Result<NodeHandle> {
    let mut config = Config::default();
    config.node.data_dir = dir.to_path_buf();
    config.node.io_threads = 1;
    config.listener.tcp.bind = SocketAddr::from(([127, 0, 0, 1], 0));
    config.listener.ws.enabled = false;
    config.listener.service.enabled = false;
    let auth = HmacAuth {
        secret: secret.to_vec(),
    }
    .start();
    Ok(Node::builder(config)
        .authenticate(auth.recipient())
        .start()
        .await?)
}

/// Connect `client_id` with `password`; the CONNACK's outcome.
pub async fn try_connect(
    addr: SocketAddr,
    client_id: &str,
    password: &str,
) -> Result<(), rumqttc::ConnectionError> {
    let mut opts = rumqttc::MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    opts.set_credentials("device", password);
    opts.set_keep_alive(Duration::from_secs(10));
    let (client, mut events) = rumqttc::AsyncClient::new(opts, 4);
    loop {
        match events.poll().await? {
            rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)) => {
                let _ = client.disconnect().await;
                let _ = tokio::time::timeout(Duration::from_millis(100), events.poll()).await;
                return Ok(());
            }
            _ => continue,
        }
    }
}

fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let secret = b"shared-secret";
    actix_rt::System::new().block_on(async {
        let node = start(dir.path(), secret).await?;
        let addr = node
            .mqtt_addr()
            .ok_or_else(|| anyhow::anyhow!("no TCP listener"))?;
        let good = password_for(secret, "device-1");
        println!(
            "device-1, signed:  {:?}",
            try_connect(addr, "device-1", &good).await
        );
        println!(
            "device-2, reused:  {:?}",
            try_connect(addr, "device-2", &good).await
        );
        node.stop().await;
        anyhow::Ok(())
    })
}
