//! The send side of one TURN TCP/TLS connection: a bounded byte buffer behind a short,
//! per-connection lock.
//!
//! Every frame towards the client (relayed ChannelData and Data indications from the
//! relay sockets' readers, control responses from the crate through `Conn::send_to`)
//! goes through [`Outbox::send`], which takes the frame whole or not at all, so frames
//! are never interleaved. Plain TCP: while nothing is pending the sender writes the frame
//! (and its padding) to the socket on the spot with a non-blocking `try_write`: no copy,
//! no task hop. Only what the socket does not take at once is buffered, and the
//! connection's writer task is woken to flush it when the socket is writable; frames sent
//! meanwhile are appended behind it. [`Outbox::send_many`] does the same for the frames
//! of one relay-socket batch with one vectored write. TLS: the stream cannot be written
//! without awaiting, so frames are appended and the writer task, woken once per batch,
//! encrypts and writes everything pending, one TLS record per frame (`turnutils_uclient`,
//! for one, reads one message per record).
//!
//! At most [`OUTBOX_BYTES`] (256 KiB; over TLS also at most [`OUTBOX_FRAMES`], 4096
//! frames) wait per connection: a client that does not read
//! loses further frames (counted as `client_backpressure`) and never stalls the relay
//! socket readers or other clients.

use bytes::{Buf, BytesMut};
use std::collections::VecDeque;
use std::io::{ErrorKind, IoSlice};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::metrics::DropReason;

/// Bytes waiting towards one client before further frames are dropped.
pub(crate) const OUTBOX_BYTES: usize = 256 * 1024;
/// TLS: frames waiting towards one client before further ones are dropped.
pub(crate) const OUTBOX_FRAMES: usize = 4096;
/// An emptied buffer larger than this is freed rather than kept.
const KEEP_CAPACITY: usize = 16 * 1024;
/// How long a closing connection may take to send its TLS close_notify.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(1);
const ZEROS: [u8; 3] = [0; 3];
/// Frames written with one vectored write by [`Outbox::send_many`] (more are buffered and
/// flushed by the writer task).
pub(crate) const MANY: usize = 16;

/// The send side of one connection.
pub(crate) struct Outbox {
    state: Mutex<State>,
    /// Wakes the writer task: something was buffered.
    wake: Notify,
    /// Plain TCP: the socket, written on the spot.
    direct: Option<Arc<OwnedWriteHalf>>,
    /// The connection's: cancelled when a write fails.
    cancel: CancellationToken,
}

#[derive(Default)]
struct State {
    /// Bytes not yet handed to the socket (whole frames, except a first partial one).
    pending: BytesMut,
    /// TLS: the length of every pending frame (each is written as its own TLS record:
    /// some clients read one message per record).
    lens: VecDeque<u32>,
    /// TLS: bytes the writer task took and is still writing.
    inflight: usize,
    closed: bool,
}

enum Flush {
    Done,
    Blocked,
    Failed,
}

impl Outbox {
    pub(crate) fn new(direct: Option<Arc<OwnedWriteHalf>>, cancel: CancellationToken) -> Self {
        Outbox {
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            direct,
            cancel,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends `frame` followed by `pad` (0..=3) zero bytes, whole or not at all; never
    /// blocks.
    pub(crate) fn send(&self, frame: &[u8], pad: usize) -> Result<(), DropReason> {
        let total = frame.len() + pad;
        let mut st = self.state();
        if st.closed {
            return Err(DropReason::SendError);
        }
        if st.pending.len() + st.inflight + total > OUTBOX_BYTES || st.lens.len() >= OUTBOX_FRAMES {
            return Err(DropReason::ClientBackpressure);
        }
        let mut written = 0;
        if st.pending.is_empty()
            && let Some(wr) = &self.direct
        {
            let r = if pad == 0 {
                wr.try_write(frame)
            } else {
                wr.try_write_vectored(&[IoSlice::new(frame), IoSlice::new(&ZEROS[..pad])])
            };
            match r {
                Ok(n) if n == total => return Ok(()),
                Ok(n) if n > 0 => written = n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                _ => {
                    st.closed = true;
                    drop(st);
                    self.cancel.cancel();
                    return Err(DropReason::SendError);
                }
            }
        }
        let was_empty = st.pending.is_empty();
        append(&mut st.pending, frame, pad, written);
        if self.direct.is_none() {
            st.lens.push_back((total - written) as u32);
        }
        drop(st);
        if was_empty {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Sends `frames` (each with its padding, 0..=3 zero bytes) in order: as many whole
    /// frames as the budget takes, with one vectored write while nothing is pending (one
    /// TCP segment for all of them instead of one each). Returns how many were taken and,
    /// if not all, why the rest was dropped. Never blocks.
    pub(crate) fn send_many(&self, frames: &[(&[u8], usize)]) -> (usize, Option<DropReason>) {
        let mut st = self.state();
        if st.closed {
            return (0, Some(DropReason::SendError));
        }
        let mut used = st.pending.len() + st.inflight;
        let mut k = 0;
        for (f, pad) in frames {
            if used + f.len() + pad > OUTBOX_BYTES || st.lens.len() + k >= OUTBOX_FRAMES {
                break;
            }
            used += f.len() + pad;
            k += 1;
        }
        let rest = (k < frames.len()).then_some(DropReason::ClientBackpressure);
        if k == 0 {
            return (0, rest);
        }
        let frames = &frames[..k];
        let mut written = 0;
        if st.pending.is_empty()
            && let Some(wr) = &self.direct
        {
            let mut iov = [IoSlice::new(&[]); 2 * MANY];
            let mut n_iov = 0;
            let mut total = 0;
            for (f, pad) in frames.iter().take(MANY) {
                iov[n_iov] = IoSlice::new(f);
                n_iov += 1;
                if *pad > 0 {
                    iov[n_iov] = IoSlice::new(&ZEROS[..*pad]);
                    n_iov += 1;
                }
                total += f.len() + pad;
            }
            match wr.try_write_vectored(&iov[..n_iov]) {
                Ok(n) if n == total && frames.len() <= MANY => return (k, rest),
                Ok(n) => written = n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => {
                    st.closed = true;
                    drop(st);
                    self.cancel.cancel();
                    return (0, Some(DropReason::SendError));
                }
            }
        }
        let was_empty = st.pending.is_empty();
        let mut at = 0;
        for (f, pad) in frames {
            let len = f.len() + pad;
            let skip = written.saturating_sub(at).min(len);
            if skip < len {
                append(&mut st.pending, f, *pad, skip);
                if self.direct.is_none() {
                    st.lens.push_back((len - skip) as u32);
                }
            }
            at += len;
        }
        drop(st);
        if was_empty {
            self.wake.notify_one();
        }
        (k, rest)
    }

    /// Refuses further frames (the connection is closing).
    pub(crate) fn close(&self) {
        self.state().closed = true;
        self.wake.notify_one();
    }

    /// Writes what is pending until the socket would block.
    fn flush_now(&self, wr: &OwnedWriteHalf) -> Flush {
        let mut st = self.state();
        loop {
            if st.pending.is_empty() {
                if st.pending.capacity() > KEEP_CAPACITY {
                    st.pending = BytesMut::new();
                }
                return Flush::Done;
            }
            match wr.try_write(&st.pending) {
                Ok(n) if n > 0 => st.pending.advance(n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Flush::Blocked,
                _ => {
                    st.closed = true;
                    return Flush::Failed;
                }
            }
        }
    }

    /// Plain TCP writer task: flushes what `send` could not write, when the socket is
    /// writable. Returns when the connection is cancelled or a write fails.
    pub(crate) async fn flush_direct(&self, wr: &OwnedWriteHalf) {
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = self.wake.notified() => {}
            }
            loop {
                match self.flush_now(wr) {
                    Flush::Done => break,
                    Flush::Blocked => {}
                    Flush::Failed => return self.cancel.cancel(),
                }
                let ready = tokio::select! {
                    _ = self.cancel.cancelled() => return,
                    r = wr.writable() => r,
                };
                if ready.is_err() {
                    self.state().closed = true;
                    return self.cancel.cancel();
                }
            }
        }
    }

    /// TLS writer task: writes everything pending, frame by frame, each time it is woken.
    /// Returns (after a bounded shutdown) when the connection is cancelled or a write
    /// fails.
    pub(crate) async fn flush_queued<W: AsyncWrite + Unpin>(&self, mut wr: W) {
        'outer: loop {
            tokio::select! {
                _ = self.cancel.cancelled() => break,
                _ = self.wake.notified() => {}
            }
            loop {
                let (batch, lens) = {
                    let mut st = self.state();
                    if st.pending.is_empty() {
                        break;
                    }
                    let batch = std::mem::take(&mut st.pending);
                    let lens = std::mem::take(&mut st.lens);
                    st.inflight = batch.len();
                    (batch, lens)
                };
                let written = tokio::select! {
                    _ = self.cancel.cancelled() => break 'outer,
                    r = async {
                        let mut at = 0;
                        for len in lens {
                            let end = at + len as usize;
                            wr.write_all(&batch[at..end]).await?;
                            at = end;
                        }
                        wr.flush().await
                    } => r,
                };
                let mut st = self.state();
                st.inflight = 0;
                if written.is_err() {
                    st.closed = true;
                    drop(st);
                    self.cancel.cancel();
                    break 'outer;
                }
            }
        }
        let _ = tokio::time::timeout(SHUTDOWN_TIMEOUT, wr.shutdown()).await;
    }
}

/// Appends what is left of `frame` + `pad` zero bytes after the first `skip` bytes.
fn append(pending: &mut BytesMut, frame: &[u8], pad: usize, skip: usize) {
    if skip < frame.len() {
        pending.extend_from_slice(&frame[skip..]);
        pending.extend_from_slice(&ZEROS[..pad]);
    } else {
        pending.extend_from_slice(&ZEROS[..pad - (skip - frame.len())]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};

    /// A plain TCP connection's outbox with its writer task, the client end of the
    /// connection (small kernel buffers, so that the outbox is what fills) and the
    /// server's read half (kept open).
    async fn direct() -> (
        TcpStream,
        Arc<Outbox>,
        CancellationToken,
        tokio::task::JoinHandle<()>,
        tokio::net::tcp::OwnedReadHalf,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let _ = socket2::SockRef::from(&server).set_send_buffer_size(16 * 1024);
        let _ = socket2::SockRef::from(&client).set_recv_buffer_size(16 * 1024);
        let (rd, wr) = server.into_split();
        let wr = Arc::new(wr);
        let cancel = CancellationToken::new();
        let out = Arc::new(Outbox::new(Some(Arc::clone(&wr)), cancel.clone()));
        let flusher = Arc::clone(&out);
        let writer = tokio::spawn(async move { flusher.flush_direct(&wr).await });
        (client, out, cancel, writer, rd)
    }

    #[test]
    fn append_skips_what_was_written() {
        let mut b = BytesMut::new();
        append(&mut b, b"abcde", 3, 0);
        assert_eq!(&b[..], b"abcde\0\0\0");
        let mut b = BytesMut::new();
        append(&mut b, b"abcde", 3, 2);
        assert_eq!(&b[..], b"cde\0\0\0");
        let mut b = BytesMut::new();
        append(&mut b, b"abcde", 3, 6);
        assert_eq!(&b[..], b"\0\0");
    }

    /// Batches of frames (up to three times [`MANY`] at once, odd sizes with padding) sent
    /// with `send_many` to a client that does not read: whole frames are taken up to the
    /// bound, the rest of a batch is dropped and reported, and once the client reads it
    /// gets exactly the taken frames, in order, padded, also across a write that the
    /// socket took only in part.
    #[tokio::test]
    async fn send_many_takes_whole_frames_in_order_up_to_the_bound() {
        let (mut client, out, cancel, writer, _rd) = direct().await;

        let frame = |i: u32| {
            let mut f = vec![(i % 251) as u8; 100 + (i as usize % 7) * 150];
            f[..4].copy_from_slice(&i.to_be_bytes());
            f
        };
        let pad = |f: &Vec<u8>| (4 - f.len() % 4) % 4;
        let mut expected = Vec::new();
        let mut next = 0u32;
        let mut refused = 0;
        while refused == 0 {
            let n = 1 + (next as usize % (3 * MANY));
            let frames: Vec<Vec<u8>> = (next..next + n as u32).map(frame).collect();
            let batch: Vec<(&[u8], usize)> = frames.iter().map(|f| (&f[..], pad(f))).collect();
            let (taken, why) = out.send_many(&batch);
            for f in &frames[..taken] {
                expected.extend_from_slice(f);
                expected.extend_from_slice(&ZEROS[..pad(f)]);
            }
            if taken < n {
                assert_eq!(why, Some(DropReason::ClientBackpressure));
                refused = n - taken;
            } else {
                assert_eq!(why, None);
            }
            next += n as u32;
            assert!(next < 100_000, "the outbox never filled");
        }
        assert!(out.state().pending.len() <= OUTBOX_BYTES);
        let mut got = vec![0u8; expected.len()];
        tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut got))
            .await
            .expect("every taken frame arrives")
            .unwrap();
        assert!(
            got == expected,
            "the bytes are the taken frames, in order, padded"
        );
        assert!(eventually(|| out.state().pending.is_empty()).await);
        cancel.cancel();
        let _ = writer.await;
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), client.read_to_end(&mut rest)).await;
        assert!(
            rest.is_empty(),
            "nothing of the refused frames: {} bytes",
            rest.len()
        );
    }

    /// A client that does not read: the outbox fills up to its bound, then drops whole
    /// frames; once the client reads, it gets every accepted frame, in order, padded,
    /// and nothing of the dropped ones.
    #[tokio::test]
    async fn a_client_that_does_not_read_is_bounded_and_gets_whole_frames() {
        let (mut client, out, cancel, writer, _rd) = direct().await;

        // 161-byte frames + 3 bytes of padding, numbered.
        let frame = |i: u32| {
            let mut f = vec![(i % 251) as u8; 161];
            f[..4].copy_from_slice(&i.to_be_bytes());
            f
        };
        let mut accepted = 0u32;
        let mut dropped = 0;
        for i in 0..200_000u32 {
            if dropped == 100 {
                break;
            }
            match out.send(&frame(i), 3) {
                Ok(()) if dropped == 0 => accepted += 1,
                Ok(()) => panic!("frame {i} accepted after drops began without reading"),
                Err(DropReason::ClientBackpressure) => dropped += 1,
                Err(_) => panic!("frame {i}: not backpressure"),
            }
        }
        assert!(dropped > 0, "the outbox never filled");
        assert!(out.state().pending.len() <= OUTBOX_BYTES);
        // The socket buffers took some, the outbox at most its bound.
        assert!((accepted as usize) * 164 > OUTBOX_BYTES / 2);

        let want = accepted as usize * 164;
        let mut got = vec![0u8; want];
        tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut got))
            .await
            .expect("every accepted frame arrives")
            .unwrap();
        for (i, chunk) in got.chunks(164).enumerate() {
            let mut want = frame(i as u32);
            want.extend_from_slice(&[0; 3]);
            assert_eq!(chunk, &want[..], "frame {i}");
        }
        // Once drained, frames go through again.
        assert!(eventually(|| out.state().pending.is_empty()).await);
        out.send(b"more", 0).unwrap();
        let mut more = [0u8; 4];
        client.read_exact(&mut more).await.unwrap();
        assert_eq!(&more, b"more");

        out.close();
        cancel.cancel();
        writer.await.unwrap();
        assert!(matches!(out.send(b"x", 0), Err(DropReason::SendError)));
    }

    async fn eventually(mut cond: impl FnMut() -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while tokio::time::Instant::now() < deadline {
            if cond() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        false
    }
}
