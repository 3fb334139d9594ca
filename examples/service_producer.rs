//! Produce messages to a running node over the service protocol.
//!
//! ```text
//! cargo run --release --example service_producer -- [ADDR] [TOPIC] [COUNT] [BATCH]
//! # defaults: 127.0.0.1:9883 home/room1/cmd 10 1
//! ```
//!
//! On a node that wants a login, set `ACTIMQ_USERNAME` and `ACTIMQ_PASSWORD`. On a
//! service listener with TLS, set `ACTIMQ_CA_FILE` to the CA's PEM file: the example
//! then connects over TLS and expects a server certificate for ADDR's IP address
//! (`ACTIMQ_TLS_SERVER_NAME` names another, e.g. `localhost`); `ACTIMQ_CERT_FILE` and
//! `ACTIMQ_KEY_FILE` add a client certificate (mutual TLS).
//!
//! Devices subscribed to a matching filter receive the messages (at QoS 1, min their
//! subscription's); consumer groups on the first-level topic read them. With COUNT
//! larger than 1000 it prints the produce throughput.

use std::time::Instant;

use actimq::client::{
    message, Credentials, ProduceMessageExt, Producer, ProducerOptions, Props, TlsOptions,
};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let addr: std::net::SocketAddr = args
        .first()
        .map_or("127.0.0.1:9883", String::as_str)
        .parse()?;
    let topic = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "home/room1/cmd".into());
    let count: usize = args.get(2).map_or(Ok(10), |s| s.parse())?;
    let batch: usize = args.get(3).map_or(Ok(1), |s| s.parse())?.max(1);
    let mut opts = ProducerOptions::new("example-producer").credentials(Credentials::from_env());
    if let Some(tls) = TlsOptions::from_env(&addr.ip().to_string())? {
        opts = opts.tls(tls);
    }
    let mut producer = Producer::connect_with(addr, opts).await?;
    let start = Instant::now();
    let mut sent = 0;
    while sent < count {
        let n = batch.min(count - sent);
        let messages = (sent..sent + n)
            .map(|i| {
                message(topic.clone(), format!("message {i}").into_bytes())
                    .qos(1)
                    .props(Props {
                        content_type: Some("text/plain".into()),
                        user_properties: vec![("source".into(), "service_producer".into())],
                        ..Props::default()
                    })
            })
            .collect();
        let positions = producer.send_batch(messages).await?;
        if count <= 20 {
            println!("stored {n} message(s) at {positions:?}");
        }
        sent += n;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "produced {count} messages to {topic} in {secs:.3} s ({:.0} msg/s)",
        count as f64 / secs
    );
    Ok(())
}
