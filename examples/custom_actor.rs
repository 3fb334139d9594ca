//! A rule engine in a few lines: an actor that consumes `sensors/+/temperature`, keeps
//! a moving average per sensor, and publishes `alerts/{sensor}` when the average
//! crosses a threshold (and again only after it fell back below).
//!
//! ```text
//! cargo run --example custom_actor
//! ```
//!
//! The actor reads through `Subscription` (the same Watch/Arrived/Pull path as a
//! device, with its offset committed under its own name) and writes through
//! `Gateway::publish` (the same Route/Append path as a device's PUBLISH).
//! `tests/extend_examples.rs` drives it with MQTT clients.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use actimq::{Config, Node, NodeHandle};
use actimq_actors::mqtt::subscription::{Delivered, QueueOf, Subscription};
use actimq_actors::mqtt::Gateway;
use actimq_actors::storage::Message;
use actix::prelude::*;

/// The rule: per sensor, the average of the last `window` readings; an alert when it
/// goes above `threshold`.
pub struct TemperatureRule {
    pub gateway: Gateway,
    pub window: usize,
    pub threshold: f64,
    readings: HashMap<String, VecDeque<f64>>,
    alerting: HashSet<String>,
}

impl TemperatureRule {
    pub fn new(gateway: Gateway, window: usize, threshold: f64) -> Self {
        TemperatureRule {
            gateway,
            window: window.max(1),
            threshold,
            readings: HashMap::new(),
            alerting: HashSet::new(),
        }
    }
}

impl Actor for TemperatureRule {
    type Context = Context<Self>;
}

impl Handler<Delivered> for TemperatureRule {
    type Result = ();

    fn handle(&mut self, d: Delivered, ctx: &mut Context<Self>) {
        // sensors/{id}/temperature, payload a decimal number; anything else is ignored.
        let mut levels = d.message.topic.split('/');
        let (Some("sensors"), Some(sensor), Some("temperature"), None) =
            (levels.next(), levels.next(), levels.next(), levels.next())
        else {
            return;
        };
        let Some(value) = std::str::from_utf8(&d.message.payload)
            .ok()
            .and_then(|s| s.trim().parse::<f64>().ok())
        else {
            return;
        };
        let window = self.readings.entry(sensor.to_string()).or_default();
        window.push_back(value);
        if window.len() > self.window {
            window.pop_front();
        }
        let avg = window.iter().sum::<f64>() / window.len() as f64;
        let above = avg > self.threshold;
        let was = self.alerting.contains(sensor);
        if above == was {
            return;
        }
        if !above {
            self.alerting.remove(sensor);
            return;
        }
        self.alerting.insert(sensor.to_string());
        let alert = Message {
            topic: format!("alerts/{sensor}"),
            payload: format!("{avg:.1}").into(),
            qos: 1,
            retain: false,
            publisher: "rule:temperature".into(),
            timestamp_ms: actimq_actors::now_ms(),
            props: Default::default(),
        };
        let gw = self.gateway.clone();
        ctx.spawn(
            async move {
                let _ = gw.publish(alert).await;
            }
            .into_actor(self),
        );
    }
}

/// Start a node in `dir` and the rule (window of `window` readings, `threshold`).
pub async fn start(dir: &Path, window: usize, threshold: f64) -> anyhow::Result<NodeHandle> {
    let mut config = Config::default();
    config.node.data_dir = dir.to_path_buf();
    config.node.io_threads = 1;
    config.listener.tcp.bind = SocketAddr::from(([127, 0, 0, 1], 0));
    config.listener.ws.enabled = false;
    config.listener.service.enabled = false;
    let node = Node::start(config, slog::Logger::root(slog::Discard, slog::o!())).await?;
    let gw = node.gateway().clone();
    let rule = TemperatureRule::new(gw.clone(), window, threshold).start();
    let sub = Subscription::start(
        gw,
        "rule:temperature",
        "sensors/+/temperature",
        rule.recipient(),
    )
    .map_err(|e| anyhow::anyhow!("bad filter: {e:?}"))?;
    // Routing has begun once the subscription knows its queue.
    sub.send(QueueOf)
        .await?
        .ok_or_else(|| anyhow::anyhow!("the subscription could not start"))?;
    Ok(node)
}

fn main() -> anyhow::Result<()> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let dir = tempfile::tempdir()?;
    actix_rt::System::new().block_on(async {
        let node = start(dir.path(), 3, 30.0).await?;
        let addr = node
            .mqtt_addr()
            .ok_or_else(|| anyhow::anyhow!("no TCP listener"))?;
        let opts = MqttOptions::new("operator", addr.ip().to_string(), addr.port());
        let (client, mut events) = AsyncClient::new(opts, 16);
        client.subscribe("alerts/#", QoS::AtLeastOnce).await?;
        // Give the subscription (and the rule's) a moment before publishing.
        tokio::time::sleep(Duration::from_millis(300)).await;
        for t in ["25", "31", "36", "38"] {
            client
                .publish("sensors/kitchen/temperature", QoS::AtLeastOnce, false, t)
                .await?;
        }
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Event::Incoming(Packet::Publish(p)) = events.poll().await? {
                    println!("{}: {}", p.topic, String::from_utf8_lossy(&p.payload));
                    return anyhow::Ok(());
                }
            }
        })
        .await??;
        node.stop().await;
        anyhow::Ok(())
    })
}
