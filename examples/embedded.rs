//! actimq as a library: start a node inside your own program, talk MQTT to it with an
//! ordinary client (rumqttc), then stop it.
//!
//! ```text
//! cargo run --example embedded
//! ```
//!
//! `tests/extend_examples.rs` runs [`demo`] and checks what it returns.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use actimq::{Config, Node};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

/// A configuration for an embedded node: data in `dir`, MQTT over TCP on a free
/// local port, every other listener off.
pub fn config(dir: &Path) -> Config {
    let mut config = Config::default();
    config.node.data_dir = dir.to_path_buf();
    config.node.io_threads = 1;
    config.listener.tcp.bind = SocketAddr::from(([127, 0, 0, 1], 0));
    config.listener.ws.enabled = false;
    config.listener.tls.enabled = false;
    config.listener.wss.enabled = false;
    config.listener.service.enabled = false;
    config
}

/// Start a node, subscribe to `greetings/#` and publish `greetings/world` with an MQTT
/// client, stop the node. Returns what the client received: (topic, payload).
pub async fn demo(dir: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let node = Node::start(config(dir), slog::Logger::root(slog::Discard, slog::o!())).await?;
    let addr = node
        .mqtt_addr()
        .ok_or_else(|| anyhow::anyhow!("the TCP listener is off"))?;

    let mut opts = MqttOptions::new("embedded-demo", addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(10));
    let (client, mut events) = AsyncClient::new(opts, 16);
    client.subscribe("greetings/#", QoS::AtLeastOnce).await?;
    client
        .publish("greetings/world", QoS::AtLeastOnce, false, "hello")
        .await?;

    let mut got = Vec::new();
    let wait = tokio::time::timeout(Duration::from_secs(10), async {
        while got.is_empty() {
            if let Event::Incoming(Packet::Publish(p)) = events.poll().await? {
                got.push((
                    p.topic.clone(),
                    String::from_utf8_lossy(&p.payload).into_owned(),
                ));
            }
        }
        anyhow::Ok(())
    });
    wait.await??;
    client.disconnect().await?;
    // Let the event loop send DISCONNECT.
    let _ = tokio::time::timeout(Duration::from_millis(200), events.poll()).await;

    println!(
        "{} connection(s) live before stop",
        node.gateway().connections().await
    );
    node.stop().await;
    Ok(got)
}

fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let got = actix_rt::System::new().block_on(demo(dir.path()))?;
    for (topic, payload) in got {
        println!("received {topic}: {payload}");
    }
    Ok(())
}
