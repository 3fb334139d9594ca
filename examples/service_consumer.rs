//! Consume a first-level topic of a running node as a member of a consumer group.
//!
//! ```text
//! cargo run --release --example service_consumer -- [ADDR] [GROUP] [TOPIC] [COUNT]
//! # defaults: 127.0.0.1:9883 example home 0 (0: run until interrupted)
//! ```
//!
//! On a node that wants a login, set `ACTIMQ_USERNAME` and `ACTIMQ_PASSWORD`. On a
//! service listener with TLS, set `ACTIMQ_CA_FILE` to the CA's PEM file: the example
//! then connects over TLS and expects a server certificate for ADDR's IP address
//! (`ACTIMQ_TLS_SERVER_NAME` names another, e.g. `localhost`); `ACTIMQ_CERT_FILE` and
//! `ACTIMQ_KEY_FILE` add a client certificate (mutual TLS).
//!
//! Start several with the same GROUP to split the partitions between them; stop one
//! and the others take its partitions over from the committed offsets.

use std::time::{Duration, Instant};

use actimq::client::{Consumer, ConsumerOptions, Credentials, TlsOptions};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let addr: std::net::SocketAddr = args
        .first()
        .map_or("127.0.0.1:9883", String::as_str)
        .parse()?;
    let group = args.get(1).cloned().unwrap_or_else(|| "example".into());
    let topic = args.get(2).cloned().unwrap_or_else(|| "home".into());
    let count: usize = args.get(3).map_or(Ok(0), |s| s.parse())?;
    let mut opts = ConsumerOptions::new(&group, &topic).credentials(Credentials::from_env());
    if let Some(tls) = TlsOptions::from_env(&addr.ip().to_string())? {
        opts = opts.tls(tls);
    }
    let mut consumer = Consumer::connect_with(addr, opts).await?;
    println!(
        "joined {group} on {topic}: partitions {:?}",
        consumer.partitions()
    );
    let mut seen = 0usize;
    let mut start = None;
    while count == 0 || seen < count {
        let batch = consumer.poll(1000, Duration::from_secs(5)).await?;
        if batch.is_empty() {
            continue;
        }
        let t0 = *start.get_or_insert_with(Instant::now);
        for m in &batch {
            if count == 0 || count <= 20 {
                println!(
                    "{} p{}@{} from {} qos {}: {:?} {:?}",
                    m.topic,
                    m.partition,
                    m.offset,
                    m.publisher,
                    m.qos,
                    String::from_utf8_lossy(&m.payload),
                    m.props.user_properties
                );
            }
        }
        seen += batch.len();
        consumer.commit(&batch).await?;
        if count > 0 && seen >= count {
            let secs = t0.elapsed().as_secs_f64();
            println!(
                "consumed {seen} messages in {secs:.3} s ({:.0} msg/s)",
                seen as f64 / secs
            );
        }
    }
    Ok(())
}
