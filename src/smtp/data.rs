//! Strict DATA framing, sans IO.
//!
//! The only end of data is `<CR><LF>.<CR><LF>` (the first CRLF may be the one
//! that ended the DATA command). A bare LF or a bare CR anywhere is recorded as
//! an error but never ends the message or starts a new line, so sequences such
//! as `\n.\n`, `\r.\r\n` or `\n.\r\n` cannot end a message early and smuggle
//! the rest as commands. The reader keeps scanning after an error until the
//! real end, so the reply comes at a well-defined point and the remaining bytes
//! are never interpreted as commands. Dot-stuffing is undone on the way.
//! A NUL is refused the same way: some receivers end a string there, so a
//! NUL would let the part after it be read differently downstream.
//!
//! With a [`Reservation`], the body buffer grows only as far as the shared
//! DATA memory budget allows: its capacity is reserved before it is
//! allocated; past the budget the message fails with
//! [`DataError::NoMemory`] and its buffer is freed at once.

use super::budget::Reservation;

/// Why a message was refused, in the order they were found (the first wins).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataError {
    BareLf,
    BareCr,
    Nul,
    LineTooLong,
    TooBig,
    /// The DATA memory budget ran out while the body was buffered.
    NoMemory,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a line.
    LineStart,
    /// A `.` at the start of a line.
    Dot,
    /// `.` `CR` at the start of a line.
    DotCr,
    /// Inside a line.
    Mid,
    /// A `CR` inside a line (or after a stuffed dot).
    Cr,
}

/// Receives the bytes that follow `354` and finds the end of data.
#[derive(Debug)]
pub struct DataReader {
    state: State,
    body: Vec<u8>,
    line_len: usize,
    max_line: usize,
    max_size: usize,
    error: Option<DataError>,
    /// Octets seen, including those dropped after an error.
    seen: u64,
    /// The body's capacity, reserved from the DATA memory budget.
    memory: Option<Reservation>,
}

/// Outcome of feeding bytes to a [`DataReader`].
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    /// The end has not been seen; every byte was consumed.
    More,
    /// The end was seen after `consumed` bytes of the input; the rest is
    /// the next command.
    Done { consumed: usize },
}

impl DataReader {
    /// `max_line` counts the line's CRLF (RFC 5321: 1000); `max_size` is the
    /// largest body accepted.
    pub fn new(max_line: usize, max_size: usize) -> DataReader {
        DataReader {
            state: State::LineStart,
            body: Vec::with_capacity(DataReader::initial_capacity(max_size)),
            line_len: 0,
            max_line: max_line.saturating_sub(2),
            max_size,
            error: None,
            seen: 0,
            memory: None,
        }
    }

    /// The buffer [`DataReader::new`] allocates at once: reserve this much
    /// before making one.
    pub fn initial_capacity(max_size: usize) -> usize {
        max_size.min(64 * 1024)
    }

    /// Grows the body only within `memory`, which must already hold
    /// [`DataReader::initial_capacity`].
    pub fn with_memory(mut self, memory: Reservation) -> DataReader {
        self.memory = Some(memory);
        self
    }

    /// The reservation, to keep until the body it covers is gone.
    pub fn take_memory(&mut self) -> Option<Reservation> {
        self.memory.take()
    }

    fn fail(&mut self, e: DataError) {
        if self.error.is_none() {
            self.error = Some(e);
            self.body = Vec::new();
            if let Some(m) = self.memory.as_mut() {
                m.resize(0);
            }
        }
    }

    /// Room for `n` more body octets, reserved before it is allocated
    /// (doubling, as a Vec does, but never past `max_size`). False if the
    /// budget is spent (the message has then failed).
    fn room(&mut self, n: usize) -> bool {
        let need = self.body.len() + n;
        if need <= self.body.capacity() {
            return true;
        }
        let Some(memory) = self.memory.as_mut() else {
            return true;
        };
        let cap = (self.body.capacity() * 2)
            .max(need)
            .min(self.max_size.max(need));
        if !memory.resize(cap) {
            self.fail(DataError::NoMemory);
            return false;
        }
        self.body.reserve_exact(cap - self.body.len());
        true
    }

    fn push(&mut self, b: u8) {
        self.line_len += 1;
        if self.line_len > self.max_line {
            self.fail(DataError::LineTooLong);
        }
        if self.error.is_none() {
            if self.body.len() >= self.max_size {
                self.fail(DataError::TooBig);
            } else if self.room(1) {
                self.body.push(b);
            }
        }
    }

    fn push_crlf(&mut self) {
        if self.error.is_none() {
            if self.body.len() + 2 > self.max_size {
                self.fail(DataError::TooBig);
            } else if self.room(2) {
                self.body.extend_from_slice(b"\r\n");
            }
        }
        self.line_len = 0;
    }

    /// A byte inside a line (not CR).
    fn mid(&mut self, b: u8) {
        if b == b'\n' {
            self.fail(DataError::BareLf);
        } else if b == 0 {
            self.fail(DataError::Nul);
        }
        self.push(b);
        self.state = State::Mid;
    }

    /// Feeds input; stops at the end of data.
    pub fn feed(&mut self, input: &[u8]) -> Progress {
        for (i, &b) in input.iter().enumerate() {
            self.seen += 1;
            match (self.state, b) {
                (State::LineStart, b'.') => self.state = State::Dot,
                (State::LineStart | State::Mid, b'\r') => self.state = State::Cr,
                (State::LineStart | State::Mid, _) => self.mid(b),
                (State::Dot, b'\r') => self.state = State::DotCr,
                // A stuffed dot: drop it, the rest is an ordinary line.
                (State::Dot, _) => self.mid(b),
                (State::DotCr, b'\n') => {
                    return Progress::Done { consumed: i + 1 };
                }
                (State::DotCr, _) => {
                    // `.` CR x: the CR was bare.
                    self.fail(DataError::BareCr);
                    self.push(b'\r');
                    if b == b'\r' {
                        self.state = State::Cr;
                    } else {
                        self.mid(b);
                    }
                }
                (State::Cr, b'\n') => {
                    self.push_crlf();
                    self.state = State::LineStart;
                }
                (State::Cr, b'\r') => {
                    self.fail(DataError::BareCr);
                    self.push(b'\r');
                }
                (State::Cr, _) => {
                    self.fail(DataError::BareCr);
                    self.push(b'\r');
                    self.mid(b);
                }
            }
        }
        Progress::More
    }

    /// Octets received so far, including any dropped after an error.
    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// The body (unstuffed, CRLF line endings) or the first error. Call after
    /// [`Progress::Done`].
    pub fn finish(self) -> Result<Vec<u8>, DataError> {
        match self.error {
            Some(e) => Err(e),
            None => Ok(self.body),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(input: &[u8]) -> (Result<Vec<u8>, DataError>, Option<usize>) {
        let mut r = DataReader::new(1000, 1 << 20);
        match r.feed(input) {
            Progress::Done { consumed } => (r.finish(), Some(consumed)),
            Progress::More => (Err(DataError::TooBig), None),
        }
    }

    /// Feeds the input split at every position; the outcome must not change.
    fn run_split(input: &[u8]) -> (Result<Vec<u8>, DataError>, Option<usize>) {
        let whole = run(input);
        for cut in 0..=input.len() {
            let mut r = DataReader::new(1000, 1 << 20);
            let (a, b) = input.split_at(cut);
            let end = match r.feed(a) {
                Progress::Done { consumed } => Some(consumed),
                Progress::More => match r.feed(b) {
                    Progress::Done { consumed } => Some(cut + consumed),
                    Progress::More => None,
                },
            };
            let got = if end.is_some() {
                (r.finish(), end)
            } else {
                (Err(DataError::TooBig), None)
            };
            assert_eq!(
                got,
                whole,
                "split at {cut} of {:?}",
                String::from_utf8_lossy(input)
            );
        }
        whole
    }

    #[test]
    fn plain_message() {
        let (body, end) = run_split(b"Subject: x\r\n\r\nhello\r\n.\r\nQUIT\r\n");
        assert_eq!(body.unwrap(), b"Subject: x\r\n\r\nhello\r\n");
        assert_eq!(end, Some(24));
    }

    #[test]
    fn empty_message() {
        let (body, end) = run_split(b".\r\n");
        assert_eq!(body.unwrap(), b"");
        assert_eq!(end, Some(3));
    }

    #[test]
    fn dot_unstuffing() {
        let (body, _) = run_split(b"..leading\r\n...\r\n.x\r\n.\r\n");
        assert_eq!(body.unwrap(), b".leading\r\n..\r\nx\r\n");
    }

    #[test]
    fn smuggling_sequences_do_not_end_data() {
        for fake in [
            &b"\n.\n"[..],
            b"\r.\r\n",
            b"\n.\r\n",
            b"\r\n.\n",
            b"\r\n.\r\r\n",
        ] {
            let mut input = b"a".to_vec();
            input.extend_from_slice(fake);
            input.extend_from_slice(b"MAIL FROM:<evil@x>\r\n.\r\n");
            let (body, end) = run_split(&input);
            assert_eq!(end, Some(input.len()), "{fake:?} ended data early");
            assert!(body.is_err(), "{fake:?} accepted");
        }
    }

    #[test]
    fn bare_lf_and_cr_are_refused() {
        assert_eq!(run_split(b"a\nb\r\n.\r\n").0, Err(DataError::BareLf));
        assert_eq!(run_split(b"a\rb\r\n.\r\n").0, Err(DataError::BareCr));
        assert_eq!(run_split(b"a\r\r\n.\r\n").0, Err(DataError::BareCr));
        assert_eq!(run_split(b"\n.\r\n.\r\n").0, Err(DataError::BareLf));
    }

    #[test]
    fn nul_is_refused_but_read_to_the_end() {
        let input = b"a\0b\r\n.\0\r\nMAIL FROM:<x@y>\r\n.\r\nRSET\r\n";
        let (body, end) = run_split(input);
        assert_eq!(body, Err(DataError::Nul));
        assert_eq!(end, Some(input.len() - 6));
        assert_eq!(run_split(b"\0\r\n.\r\n").0, Err(DataError::Nul));
        assert_eq!(run_split(b"..\0\r\n.\r\n").0, Err(DataError::Nul));
    }

    #[test]
    fn long_line_is_refused_but_read_to_the_end() {
        let mut input = vec![b'x'; 999];
        input.extend_from_slice(b"\r\n.\r\n");
        let mut r = DataReader::new(1000, 1 << 20);
        assert_eq!(
            r.feed(&input),
            Progress::Done {
                consumed: input.len()
            }
        );
        assert_eq!(r.finish(), Err(DataError::LineTooLong));
        let mut input = vec![b'x'; 998];
        input.extend_from_slice(b"\r\n.\r\n");
        let mut r = DataReader::new(1000, 1 << 20);
        assert_eq!(
            r.feed(&input),
            Progress::Done {
                consumed: input.len()
            }
        );
        assert_eq!(r.finish().unwrap().len(), 1000);
    }

    #[test]
    fn the_body_grows_only_within_its_memory() {
        use crate::smtp::budget::MemoryBudget;
        let budget = MemoryBudget::new(100_000);
        let initial = DataReader::initial_capacity(1 << 20);
        let mut input = vec![b'x'; 998];
        input.extend_from_slice(b"\r\n");
        // 40 lines of 1000: 40 000 octets, within the first 64 KiB.
        let mut r = DataReader::new(1000, 1 << 20).with_memory(budget.reserve(initial).unwrap());
        for _ in 0..40 {
            assert_eq!(r.feed(&input), Progress::More);
        }
        assert_eq!(budget.in_use(), initial);
        // 100 lines: past 64 KiB, the doubling to 128 KiB is over budget.
        for _ in 0..60 {
            assert_eq!(r.feed(&input), Progress::More);
        }
        assert_eq!(budget.in_use(), 0, "a failed body gives its memory back");
        assert_eq!(r.feed(b".\r\n"), Progress::Done { consumed: 3 });
        assert_eq!(r.finish(), Err(DataError::NoMemory));
        // Within budget, the reservation covers the capacity until dropped.
        let budget = MemoryBudget::new(200_000);
        let mut r = DataReader::new(1000, 150_000).with_memory(budget.reserve(initial).unwrap());
        for _ in 0..100 {
            r.feed(&input);
        }
        r.feed(b".\r\n");
        let memory = r.take_memory().unwrap();
        assert_eq!(memory.held(), 131_072);
        assert_eq!(r.finish().unwrap().len(), 100_000);
        assert_eq!(budget.in_use(), 131_072);
        drop(memory);
        assert_eq!(budget.in_use(), 0);
    }

    #[test]
    fn oversize_message_is_refused() {
        let mut r = DataReader::new(1000, 10);
        assert_eq!(r.feed(b"0123456789\r\n"), Progress::More);
        assert_eq!(r.feed(b".\r\n"), Progress::Done { consumed: 3 });
        assert_eq!(r.finish(), Err(DataError::TooBig));
        let mut r = DataReader::new(1000, 12);
        r.feed(b"0123456789\r\n.\r\n");
        assert_eq!(r.finish().unwrap(), b"0123456789\r\n");
    }

    // Property tests against a plain model of RFC 5321 framing.

    use proptest::prelude::*;

    /// Where the model says the data ends: after the first `.CRLF` at the
    /// very start or the first `CRLF.CRLF`.
    fn model_end(input: &[u8]) -> Option<usize> {
        if input.starts_with(b".\r\n") {
            return Some(3);
        }
        input
            .windows(5)
            .position(|w| w == b"\r\n.\r\n")
            .map(|p| p + 5)
    }

    /// The body the model accepts from the octets before the final `.CRLF`:
    /// CRLF lines only, one leading dot removed per line, every line within
    /// `max_line` (CRLF included) and the whole within `max_size`.
    fn model_body(data: &[u8], max_line: usize, max_size: usize) -> Option<Vec<u8>> {
        if deliver_bare(data) || data.contains(&0) {
            return None;
        }
        let mut body = Vec::new();
        let mut rest = data;
        while let Some(p) = rest.windows(2).position(|w| w == b"\r\n") {
            let line = &rest[..p];
            let line = line.strip_prefix(b".").unwrap_or(line);
            if line.len() + 2 > max_line.max(2) {
                return None;
            }
            body.extend_from_slice(line);
            body.extend_from_slice(b"\r\n");
            rest = &rest[p + 2..];
        }
        (rest.is_empty() && body.len() <= max_size).then_some(body)
    }

    fn deliver_bare(b: &[u8]) -> bool {
        crate::relay::deliver::has_bare_cr_or_lf(b)
    }

    fn arb_input() -> impl Strategy<Value = Vec<u8>> {
        let framing = proptest::sample::select(vec![b'\r', b'\n', b'.', b'x', 0, 0xff]);
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..300),
            proptest::collection::vec(framing, 0..300),
            proptest::collection::vec(
                proptest::sample::select(vec![
                    &b"\r\n"[..],
                    b".",
                    b"..",
                    b"line",
                    b"\r\n.\r\n",
                    b"\n",
                    b"\r",
                    b"\n.\n",
                    b"\r.\r\n",
                    b".\r\r\n",
                    b"\0",
                    b"\xe9\xff",
                ]),
                0..60
            )
            .prop_map(|parts| parts.concat()),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        /// For any input split anywhere: the end is exactly the model's, the
        /// body is exactly the model's (so never a bare CR or LF, never over
        /// the limits), and an error is reported where the model refuses.
        #[test]
        fn reader_matches_the_model(
            input in arb_input(),
            cuts in proptest::collection::vec(any::<proptest::sample::Index>(), 0..6),
            max_line in prop_oneof![Just(1000usize), 0usize..40],
            max_size in prop_oneof![Just(1usize << 20), 0usize..200],
        ) {
            let mut at: Vec<usize> = cuts.iter().map(|i| i.index(input.len() + 1)).collect();
            at.push(0);
            at.push(input.len());
            at.sort_unstable();
            let mut r = DataReader::new(max_line, max_size);
            let mut end = None;
            for w in at.windows(2) {
                if let Progress::Done { consumed } = r.feed(&input[w[0]..w[1]]) {
                    prop_assert!(consumed <= w[1] - w[0]);
                    end = Some(w[0] + consumed);
                    break;
                }
            }
            prop_assert_eq!(end, model_end(&input));
            match end {
                None => prop_assert_eq!(r.seen(), input.len() as u64),
                Some(end) => {
                    let consumed = &input[..end];
                    prop_assert!(consumed == b".\r\n" || consumed.ends_with(b"\r\n.\r\n"));
                    prop_assert_eq!(r.seen(), end as u64);
                    let data = &consumed[..end - 3];
                    let expected = model_body(data, max_line, max_size);
                    match r.finish() {
                        Ok(body) => {
                            prop_assert!(!deliver_bare(&body));
                            prop_assert!(!body.contains(&0));
                            prop_assert!(body.len() <= max_size);
                            prop_assert_eq!(Some(body), expected);
                        }
                        Err(_) => prop_assert_eq!(expected, None),
                    }
                }
            }
        }
    }
}
