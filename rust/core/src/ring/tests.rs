//! Unit tests of the ring's private parts.

use super::*;

fn drain(consumer: &mut RingConsumer) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    consumer.read(usize::MAX, |p| out.push(p.to_vec()));
    out
}

#[test]
fn capacity_is_validated_and_rounded() {
    assert!(matches!(
        channel(4095),
        Err(CoreError::Config {
            field: "ring_bytes",
            ..
        })
    ));
    let (p, _c) = channel(5000).unwrap();
    assert_eq!(p.capacity(), 8192);
    assert_eq!(p.max_payload(), 8192 / 4 - 8);
    let (p, _c) = channel(4096).unwrap();
    assert_eq!(p.capacity(), 4096);
    #[cfg(target_pointer_width = "64")]
    assert!(matches!(
        channel((1 << 32) + 1),
        Err(CoreError::Config {
            field: "ring_bytes",
            ..
        })
    ));
}

#[test]
fn push_read_roundtrip_and_empty_payload() {
    let (p, mut c) = channel(4096).unwrap();
    p.try_push(b"hello").unwrap();
    p.try_push(b"").unwrap();
    p.try_push_with(3, |b| {
        assert_eq!(b, [0, 0, 0]);
        b.copy_from_slice(b"abc");
    })
    .unwrap();
    assert_eq!(p.used_bytes(), 16 + 8 + 16);
    assert_eq!(
        drain(&mut c),
        vec![b"hello".to_vec(), vec![], b"abc".to_vec()]
    );
    assert_eq!(c.used_bytes(), 0);
    assert_eq!(c.read(usize::MAX, |_| unreachable!()), 0);
}

#[test]
fn too_large_and_full() {
    let (p, mut c) = channel(4096).unwrap();
    let max = p.max_payload();
    assert_eq!(p.try_push(&vec![0; max + 1]), Err(PushError::TooLarge));
    let rec = vec![7u8; max];
    for _ in 0..4 {
        p.try_push(&rec).unwrap();
    }
    assert_eq!(p.try_push(b""), Err(PushError::Full));
    assert_eq!(c.read(1, |r| assert_eq!(r, &rec[..])), 1);
    p.try_push(&rec).unwrap();
    assert_eq!(drain(&mut c).len(), 4);
}

#[test]
fn wrap_writes_padding_and_zeroes() {
    let (p, mut c) = channel(4096).unwrap();
    // 4 records of 1016 bytes of ring space leave 32 bytes before the end.
    let rec = vec![1u8; 1008];
    for _ in 0..4 {
        p.try_push(&rec).unwrap();
    }
    assert_eq!(drain(&mut c).len(), 4);
    p.try_push(&[2u8; 100]).unwrap(); // 112 bytes: padding 32 + record at 0
    assert_eq!(p.used_bytes(), 32 + 112);
    p.try_push_with(50, |b| assert!(b.iter().all(|&x| x == 0)))
        .unwrap();
    let got = drain(&mut c);
    assert_eq!(got.len(), 2);
    assert_eq!(got[0], vec![2u8; 100]);
    assert_eq!(c.used_bytes(), 0);
}

#[test]
fn read_respects_max_bytes() {
    let (p, mut c) = channel(4096).unwrap();
    for i in 0..10u8 {
        p.try_push(&[i; 8]).unwrap();
    }
    let mut seen = Vec::new();
    assert_eq!(c.read(16, |r| seen.push(r[0])), 1);
    assert_eq!(c.read(33, |r| seen.push(r[0])), 3);
    assert_eq!(c.read(usize::MAX, |r| seen.push(r[0])), 6);
    assert_eq!(seen, (0..10).collect::<Vec<_>>());
}

#[test]
fn read_grouped_matches_read_across_wraps() {
    let (p, mut c) = channel(4096).unwrap();
    let mut expected = Vec::new();
    let mut got = Vec::new();
    for round in 0..20u8 {
        // Varied sizes, so records wrap at different places and groups end at block ends.
        for i in 0..(round % 7 + 30) {
            let rec = vec![round ^ i; usize::from(i) * 3 % 97];
            if p.try_push(&rec).is_err() {
                break;
            }
            expected.push(rec);
        }
        let mut groups = 0;
        c.read_grouped(usize::MAX, |g| {
            assert!(!g.is_empty() && g.len() <= READ_GROUP);
            groups += 1;
            got.extend(g.iter().map(|r| r.to_vec()));
        });
        assert!(groups > 0);
    }
    assert_eq!(got, expected);
    assert_eq!(c.used_bytes(), 0);
}

#[test]
fn panicking_writer_commits_padding() {
    let (p, mut c) = channel(4096).unwrap();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        p.try_push_with(10, |_| panic!("boom")).unwrap();
    }));
    assert!(r.is_err());
    p.try_push(b"after").unwrap();
    assert_eq!(drain(&mut c), vec![b"after".to_vec()]);
    assert_eq!(c.used_bytes(), 0);
}

#[test]
fn panicking_reader_releases_read_records() {
    let (p, mut c) = channel(4096).unwrap();
    p.try_push(b"a").unwrap();
    p.try_push(b"b").unwrap();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        c.read(usize::MAX, |_| panic!("boom"));
    }));
    assert!(r.is_err());
    assert_eq!(drain(&mut c), vec![b"b".to_vec()]);
}

#[test]
fn close_rejects_and_keeps_data() {
    let (p, mut c) = channel(4096).unwrap();
    p.try_push(b"x").unwrap();
    p.close();
    p.close();
    assert!(p.is_closed() && c.is_closed());
    assert_eq!(p.try_push(b"y"), Err(PushError::Closed));
    c.park_until(Instant::now() + Duration::from_secs(10)); // returns at once
    assert_eq!(drain(&mut c), vec![b"x".to_vec()]);
    assert_eq!(c.used_bytes(), 0);
}

#[test]
fn dropping_consumer_closes() {
    let (p, c) = channel(4096).unwrap();
    drop(c);
    assert_eq!(p.try_push(b"y"), Err(PushError::Closed));
}

#[test]
fn park_until_times_out_and_wakes() {
    let (p, mut c) = channel(4096).unwrap();
    let t0 = Instant::now();
    c.park_until(t0 + Duration::from_millis(20));
    assert!(t0.elapsed() >= Duration::from_millis(20));

    p.wake_consumer();
    let t0 = Instant::now();
    c.park_until(t0 + Duration::from_secs(10));
    assert!(t0.elapsed() < Duration::from_secs(5));

    c.set_wake_threshold(100);
    p.try_push(b"small").unwrap(); // below the threshold: still parks
    let t0 = Instant::now();
    c.park_until(t0 + Duration::from_millis(20));
    assert!(t0.elapsed() >= Duration::from_millis(20));

    let producer = p.clone();
    let h = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(30));
        producer.try_push(&[0; 200]).unwrap();
    });
    let t0 = Instant::now();
    c.park_until(t0 + Duration::from_secs(10));
    assert!(t0.elapsed() < Duration::from_secs(5));
    h.join().unwrap();
    assert_eq!(drain(&mut c).len(), 2);
}

#[test]
fn blocking_push_times_out_then_succeeds() {
    let (p, mut c) = channel(4096).unwrap();
    let rec = vec![3u8; p.max_payload()];
    while p.try_push(&rec).is_ok() {}
    let t0 = Instant::now();
    let r = p.push_with_deadline(10, t0 + Duration::from_millis(20), |_| {});
    assert_eq!(r, Err(PushError::Full));
    assert!(t0.elapsed() >= Duration::from_millis(20));

    let h = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(30));
        c.read(1, |_| {});
        c
    });
    p.push_with_deadline(10, Instant::now() + Duration::from_secs(10), |b| b.fill(9))
        .unwrap();
    let _c = h.join().unwrap();
}

#[test]
fn types_are_send_sync() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<RingProducer>();
    send::<RingConsumer>();
}
