//! Bad input on the service listener closes (or answers) that connection only.

mod common;

use std::time::Duration;

use actimq::client::{message, Producer};
use actimq_actors::service::protocol::{
    decode_body, encode_frame, ErrorCode, Request, Response, VERSION,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Read one response frame; `None` if the connection ended.
async fn read_frame(s: &mut TcpStream) -> Option<Response> {
    let len = tokio::time::timeout(common::WAIT, s.read_u32())
        .await
        .expect("a frame in time")
        .ok()? as usize;
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf).await.ok()?;
    Some(decode_body(&buf).expect("a valid response"))
}

/// Send `bytes`, expect an error frame with `code`, then the connection's end.
async fn expect_error_and_close(addr: std::net::SocketAddr, bytes: &[u8], code: ErrorCode) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    match read_frame(&mut s).await {
        Some(Response::Error { code: c, .. }) => assert_eq!(c, code),
        other => panic!("expected an error frame, got {other:?}"),
    }
    let mut rest = Vec::new();
    let n = tokio::time::timeout(common::WAIT, s.read_to_end(&mut rest))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "nothing after the error frame");
}

#[tokio::test]
async fn bad_frames_close_only_their_connection() {
    let dir = tempfile::tempdir().unwrap();
    let node = actimq::testing::TestNode::start(dir.path(), |c| c.service.max_frame_bytes = 4096);
    let addr = node.service_addr();
    // A healthy producer, open across all of it.
    let mut p = Producer::connect(addr, "healthy").await.unwrap();

    // Corrupt body.
    expect_error_and_close(
        addr,
        &[0, 0, 0, 5, VERSION, 0xff, 0xfe, 0x00, 0x13],
        ErrorCode::BadFrame,
    )
    .await;
    // Unknown version.
    let mut f = encode_frame(&Request::Hello {
        id: 1,
        name: "x".into(),
        username: None,
        password: None,
    });
    f[4] = VERSION + 1;
    expect_error_and_close(addr, &f, ErrorCode::UnsupportedVersion).await;
    // Oversized frame (only the header is sent).
    expect_error_and_close(addr, &(1u32 << 20).to_be_bytes(), ErrorCode::FrameTooLarge).await;

    // Pull on a group never joined: an error, and the connection stays usable.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&encode_frame(&Request::Pull {
        id: 9,
        group: "nope".into(),
        topic: "t".into(),
        max: 1,
        wait_ms: 0,
    }))
    .await
    .unwrap();
    match read_frame(&mut s).await {
        Some(Response::Error { id, code, .. }) => assert_eq!((id, code), (9, ErrorCode::NotMember)),
        other => panic!("{other:?}"),
    }
    // A bad join topic too.
    s.write_all(&encode_frame(&Request::Join {
        id: 10,
        group: "g".into(),
        topic: "a/b".into(),
        start: actimq::client::StartAt::Earliest,
    }))
    .await
    .unwrap();
    assert!(matches!(
        read_frame(&mut s).await,
        Some(Response::Error {
            id: 10,
            code: ErrorCode::Invalid,
            ..
        })
    ));
    s.write_all(&encode_frame(&Request::Hello {
        id: 11,
        name: "ok".into(),
        username: None,
        password: None,
    }))
    .await
    .unwrap();
    assert!(matches!(
        read_frame(&mut s).await,
        Some(Response::HelloOk { id: 11, .. })
    ));

    // The healthy connection never noticed.
    p.send(message("still/here", b"x".to_vec())).await.unwrap();
    // A truncated frame followed by a close costs nothing either.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&[0, 0, 0, 100, VERSION, 1]).await.unwrap();
    drop(s);
    tokio::time::sleep(Duration::from_millis(100)).await;
    p.send(message("still/here", b"y".to_vec())).await.unwrap();
}
