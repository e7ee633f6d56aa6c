//! The SMTP session as a state machine, sans IO.
//!
//! Bytes go in with [`Session::receive`]; [`Session::next_event`] consumes as
//! much input as it can, writes replies to an output buffer
//! ([`Session::take_output`]) and stops at the first thing it cannot decide
//! alone: a recipient to check, a message to store, a STARTTLS to perform, a
//! need for more input, or the end of the session. The caller answers the
//! first two with [`Session::recipient_verdict`] and
//! [`Session::message_stored`]. Replies are buffered until the input runs dry,
//! which is what PIPELINING (RFC 2920) asks for. Commands are parsed by
//! smtp-proto; DATA framing is [`super::data::DataReader`].

use std::borrow::Cow;
use std::net::IpAddr;

use smtp_proto::{Request, MAIL_BODY_8BITMIME, MAIL_SMTPUTF8};

use super::budget::{MemoryBudget, Reservation};
use super::data::{DataError, DataReader, Progress};
pub use crate::suspect::ProtocolTest;

/// Limits and names a session needs; built once from the config.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub hostname: String,
    pub max_line_length: usize,
    pub max_message_size: usize,
    pub max_recipients: usize,
    pub max_errors: usize,
    /// NOOP, RSET, VRFY, HELP, ETRN past this many count as errors.
    pub junk_command_limit: usize,
    pub max_received_headers: usize,
    /// STARTTLS can be offered (a certificate is configured).
    pub tls_available: bool,
    /// Shared by all sessions: the bytes of message data they may buffer.
    pub data_memory: MemoryBudget,
}

/// What the caller must do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// All input consumed: flush the output and read more.
    NeedInput,
    /// Flush the output, then close the connection.
    Close,
    /// Flush the output (it holds the `220`), then run the TLS handshake and
    /// call [`Session::tls_started`].
    StartTls,
    /// Decide on this recipient, then call [`Session::recipient_verdict`].
    Recipient { address: String, domain: String },
    /// Store this message durably, then call [`Session::message_stored`].
    Message(Box<Message>),
    /// The client failed a protocol test: the caller scores its block (or
    /// not, for a trusted client), then goes on calling `next_event`.
    ProtocolTest(ProtocolTest),
}

/// An accepted transaction, ready for the spool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub sender: String,
    pub recipients: Vec<String>,
    pub helo: String,
    pub peer: IpAddr,
    pub esmtp: bool,
    pub tls: bool,
    pub smtputf8: bool,
    pub eight_bit: bool,
    /// The body as received: unstuffed, CRLF line endings.
    pub body: Vec<u8>,
}

/// The caller's answer about a recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    /// Refuse with this full reply line (code, enhanced code, text; no CRLF).
    Refuse(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    None,
    Recipient,
    Message,
}

#[derive(Debug, Default)]
struct Transaction {
    sender: String,
    recipients: Vec<String>,
    smtputf8: bool,
    eight_bit: bool,
}

pub struct Session {
    cfg: SessionConfig,
    peer: IpAddr,
    input: Vec<u8>,
    /// Start of the unprocessed part of `input`.
    start: usize,
    output: Vec<u8>,
    helo: Option<String>,
    esmtp: bool,
    tls: bool,
    tx: Option<Transaction>,
    pending_rcpt: Option<String>,
    data: Option<DataReader>,
    /// The memory of a complete body handed out in [`Event::Message`],
    /// held until [`Session::message_stored`] (the body is gone by then).
    stored_memory: Option<Reservation>,
    pending: Pending,
    errors: usize,
    /// NOOP, RSET, VRFY, HELP, ETRN since the last accepted message.
    junk: usize,
    /// DATA phases started (the caller times each one).
    data_phases: u64,
    /// Skipping the rest of an over-long command line.
    discarding: bool,
    closed: bool,
    /// A failed protocol test to report ([`Event::ProtocolTest`]).
    failed_test: Option<ProtocolTest>,
    /// The pipelining test is reported once per session.
    pipelining_failed: bool,
}

impl Session {
    /// A new session; `tls` is true for a connection that started in TLS.
    pub fn new(cfg: SessionConfig, peer: IpAddr, tls: bool) -> Session {
        Session {
            cfg,
            peer,
            input: Vec::new(),
            start: 0,
            output: Vec::new(),
            helo: None,
            esmtp: false,
            tls,
            tx: None,
            pending_rcpt: None,
            data: None,
            stored_memory: None,
            pending: Pending::None,
            errors: 0,
            junk: 0,
            data_phases: 0,
            discarding: false,
            closed: false,
            failed_test: None,
            pipelining_failed: false,
        }
    }

    /// Queues the `220` greeting.
    pub fn greeting(&mut self) {
        let host = self.cfg.hostname.clone();
        self.reply(&format!("220 {host} ESMTP magicmx"));
    }

    /// Adds received bytes to the input buffer.
    pub fn receive(&mut self, bytes: &[u8]) {
        // Compact once per read, not once per line (pipelined commands).
        if self.start > 0 {
            self.input.drain(..self.start);
            self.start = 0;
        }
        self.input.extend_from_slice(bytes);
    }

    /// Drops all buffered input.
    fn clear_input(&mut self) {
        self.input.clear();
        self.start = 0;
    }

    fn pending_input(&self) -> &[u8] {
        &self.input[self.start..]
    }

    /// Replies waiting to be written.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.output)
    }

    pub fn has_output(&self) -> bool {
        !self.output.is_empty()
    }

    /// True while the session is reading message content (the caller uses
    /// the DATA timeout then).
    pub fn in_data(&self) -> bool {
        self.data.is_some()
    }

    /// How many DATA phases have started; tells the caller a new one began
    /// (for the whole-DATA deadline) even if the last ended in the same read.
    pub fn data_phases(&self) -> u64 {
        self.data_phases
    }

    /// True if input arrived that has not been processed yet.
    pub fn has_buffered_input(&self) -> bool {
        !self.pending_input().is_empty()
    }

    /// Octets received and not processed yet. After [`Event::NeedInput`] it
    /// is below `max_line_length` (a partial command line; DATA keeps none).
    pub fn buffered_input_len(&self) -> usize {
        self.pending_input().len()
    }

    pub fn tls_active(&self) -> bool {
        self.tls
    }

    /// The sender of the current transaction (empty: the null sender).
    pub fn sender(&self) -> Option<&str> {
        self.tx.as_ref().map(|t| t.sender.as_str())
    }

    /// The client's HELO/EHLO name, if any yet.
    pub fn helo(&self) -> Option<&str> {
        self.helo.as_deref()
    }

    fn reply(&mut self, line: &str) {
        self.output.extend_from_slice(line.as_bytes());
        self.output.extend_from_slice(b"\r\n");
    }

    /// A command error; after too many the session ends.
    fn error(&mut self, line: &str) {
        self.reply(line);
        self.count_error();
    }

    /// A command that does not move a transaction on (NOOP, RSET, VRFY,
    /// HELP, ETRN), answered as usual; past `junk_command_limit` each one
    /// counts as an error too (Postfix's `smtpd_junk_command_limit`), so a
    /// client that only chats is eventually closed.
    fn junk(&mut self) {
        self.junk += 1;
        if self.junk > self.cfg.junk_command_limit {
            self.count_error();
        }
    }

    fn count_error(&mut self) {
        if self.closed {
            return;
        }
        self.errors += 1;
        if self.errors >= self.cfg.max_errors {
            let host = self.cfg.hostname.clone();
            self.reply(&format!("421 4.7.0 {host} Error: too many errors"));
            self.closed = true;
        }
    }

    /// Runs the state machine until the caller has something to do.
    pub fn next_event(&mut self) -> Event {
        assert_eq!(
            self.pending,
            Pending::None,
            "answer the previous event first"
        );
        loop {
            if let Some(test) = self.failed_test.take() {
                return Event::ProtocolTest(test);
            }
            if self.closed {
                return Event::Close;
            }
            if self.data.is_some() {
                match self.data_step() {
                    Some(event) => return event,
                    None => continue,
                }
            }
            // Command mode: take one line.
            let Some(lf) = self.pending_input().iter().position(|&b| b == b'\n') else {
                if self.pending_input().len() >= self.cfg.max_line_length {
                    self.clear_input();
                    if !self.discarding {
                        self.discarding = true;
                        self.error("500 5.5.2 Error: line too long");
                        // That error may have been one too many (421 sent).
                        continue;
                    }
                }
                return Event::NeedInput;
            };
            let line: Vec<u8> = self.pending_input()[..=lf].to_vec();
            self.start += lf + 1;
            if self.discarding {
                // The tail of an over-long line, already answered.
                self.discarding = false;
                continue;
            }
            if line.len() > self.cfg.max_line_length {
                self.error("500 5.5.2 Error: line too long");
                continue;
            }
            if let Some(event) = self.command(&line) {
                return event;
            }
        }
    }

    fn data_step(&mut self) -> Option<Event> {
        let reader = self.data.as_mut().expect("in data");
        match reader.feed(&self.input[self.start..]) {
            Progress::More => {
                self.clear_input();
                Some(Event::NeedInput)
            }
            Progress::Done { consumed } => {
                self.start += consumed;
                let mut reader = self.data.take().expect("in data");
                let memory = reader.take_memory();
                let tx = self.tx.take().unwrap_or_default();
                match reader.finish() {
                    Ok(body) => {
                        self.stored_memory = memory;
                        self.check_message(tx, body)
                    }
                    Err(e) => {
                        let line = match e {
                            DataError::BareLf => {
                                self.failed_test = Some(ProtocolTest::BareLf);
                                "554 5.6.0 Error: bare <LF> received; lines must end with <CR><LF>"
                            }
                            DataError::BareCr => {
                                "554 5.6.0 Error: bare <CR> received; lines must end with <CR><LF>"
                            }
                            DataError::Nul => {
                                "554 5.6.0 Error: NUL character received in message content"
                            }
                            DataError::LineTooLong => "500 5.5.2 Error: line too long",
                            DataError::TooBig => {
                                "552 5.3.4 Error: message size exceeds fixed limit"
                            }
                            DataError::NoMemory => "452 4.3.1 Insufficient system storage",
                        };
                        self.reply(line);
                        None
                    }
                }
            }
        }
    }

    fn check_message(&mut self, tx: Transaction, body: Vec<u8>) -> Option<Event> {
        if crate::hops::is_loop(
            crate::hops::hops_with_ours(&body),
            self.cfg.max_received_headers,
        ) {
            self.reply("554 5.4.6 Error: too many hops (mail loop?)");
            return None;
        }
        self.pending = Pending::Message;
        Some(Event::Message(Box::new(Message {
            sender: tx.sender,
            recipients: tx.recipients,
            helo: self.helo.clone().unwrap_or_default(),
            peer: self.peer,
            esmtp: self.esmtp,
            tls: self.tls,
            smtputf8: tx.smtputf8,
            eight_bit: tx.eight_bit,
            body,
        })))
    }

    /// The caller's answer to [`Event::Message`]: the queue id, or the
    /// full reply line refusing it (e.g. a 451 when the spool failed).
    pub fn message_stored(&mut self, result: Result<&str, &str>) {
        assert_eq!(self.pending, Pending::Message);
        self.pending = Pending::None;
        self.stored_memory = None;
        match result {
            Ok(id) => {
                // A delivered message forgives earlier errors (as Postfix),
                // and junk commands: a client sending many messages with an
                // RSET or NOOP between them is not chatting.
                self.errors = 0;
                self.junk = 0;
                self.reply(&format!("250 2.0.0 Ok: queued as {id}"));
            }
            Err(line) => self.reply(line),
        }
    }

    /// The caller's answer to [`Event::Recipient`].
    pub fn recipient_verdict(&mut self, verdict: Verdict) {
        assert_eq!(self.pending, Pending::Recipient);
        self.pending = Pending::None;
        let address = self.pending_rcpt.take().unwrap_or_default();
        match verdict {
            Verdict::Accept => {
                if let Some(tx) = self.tx.as_mut() {
                    tx.recipients.push(address);
                }
                self.reply("250 2.1.5 Ok");
            }
            // A refused recipient is an error, as in Postfix: a client
            // probing for relaying (or making the node look up the MX of
            // domain after domain) is cut off after `max_errors`.
            Verdict::Refuse(line) => self.error(&line),
        }
    }

    /// The TLS handshake succeeded: the session starts over (RFC 3207).
    pub fn tls_started(&mut self) {
        self.tls = true;
        self.helo = None;
        self.esmtp = false;
        self.tx = None;
    }

    fn command(&mut self, line: &[u8]) -> Option<Event> {
        if self.screen_line(line) {
            return None;
        }
        // smtp-proto skips a CR anywhere in a line, so `EHLO a\rX: y` would
        // become `aX: y` and `u@exam\rple.test` `u@example.test`: what the
        // node acts on would differ from what other parsers see. Refuse a
        // CR that does not end the line, and a NUL (a string end for some),
        // as Postfix does.
        let text = line.strip_suffix(b"\n").unwrap_or(line);
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        if text.contains(&b'\r') {
            self.error("501 5.5.2 Error: bare <CR> received in command");
            return None;
        }
        if text.contains(&0) {
            // In MAIL and RCPT the NUL is in the address or its parameters:
            // the same refusal as other control characters there.
            let verb = text.get(..4).unwrap_or_default();
            let reply = if verb.eq_ignore_ascii_case(b"MAIL") {
                "501 5.1.7 Bad sender address syntax"
            } else if verb.eq_ignore_ascii_case(b"RCPT") {
                "501 5.1.3 Bad recipient address syntax"
            } else {
                "501 5.5.2 Error: NUL received in command"
            };
            self.error(reply);
            return None;
        }
        let (masked, literals) = mask_address_literals(line);
        let request = match Request::parse(&mut masked.iter()) {
            Ok(r) => r,
            Err(e) => {
                self.parse_error(line, e);
                return None;
            }
        };
        match request {
            Request::Ehlo { host } => self.hello(host, true),
            Request::Helo { host } => self.hello(host, false),
            Request::Lhlo { .. } => self.error("502 5.5.2 Error: command not recognized"),
            Request::Mail { mut from } => {
                from.address = unmask(from.address, &literals);
                self.mail(from, declared_size(line))
            }
            Request::Rcpt { to } => return self.rcpt(unmask(to.address, &literals)),
            Request::Data => return self.data(),
            Request::Rset => {
                self.tx = None;
                self.reply("250 2.0.0 Ok");
                self.junk();
            }
            Request::Noop { .. } => {
                self.reply("250 2.0.0 Ok");
                self.junk();
            }
            Request::Quit => {
                self.reply("221 2.0.0 Bye");
                self.closed = true;
            }
            Request::Vrfy { .. } => {
                self.reply(
                    "252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery",
                );
                self.junk();
            }
            Request::Help { .. } => {
                self.reply(
                    "214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP STARTTLS",
                );
                self.junk();
            }

            Request::StartTls => return self.starttls(),
            Request::Expn { .. }
            | Request::Auth { .. }
            | Request::Bdat { .. }
            // Not implemented, so always an error (stricter than junk).
            | Request::Etrn { .. }
            | Request::Atrn { .. }
            | Request::Burl { .. } => self.error("502 5.5.1 Error: command not implemented"),
        }
        None
    }

    /// The protocol tests a command line can fail, before it is parsed.
    /// Non-SMTP (an HTTP request, TLS or other binary bytes): the session
    /// ends at once, whoever the client is (a browser tricked into posting
    /// to port 25 must not get its later lines taken as commands). Unoffered
    /// pipelining: a line that arrived with more input behind it, before
    /// the EHLO/HELO reply or after HELO (which offers no PIPELINING), is
    /// reported once and otherwise served as usual. True if the line was
    /// consumed.
    fn screen_line(&mut self, line: &[u8]) -> bool {
        if is_non_smtp(line) {
            self.reply("521 5.5.1 Protocol error: not an SMTP command");
            self.clear_input();
            self.closed = true;
            self.failed_test = Some(ProtocolTest::NonSmtp);
            return true;
        }
        let verb = line.get(..4).unwrap_or_default();
        let hello = verb.eq_ignore_ascii_case(b"EHLO") || verb.eq_ignore_ascii_case(b"HELO");
        let unoffered = hello || (self.helo.is_some() && !self.esmtp);
        if unoffered && !self.pipelining_failed && self.has_buffered_input() {
            self.pipelining_failed = true;
            self.failed_test = Some(ProtocolTest::Pipelining);
        }
        false
    }

    fn parse_error(&mut self, line: &[u8], e: smtp_proto::Error) {
        use smtp_proto::Error as E;
        let verb = line
            .iter()
            .take_while(|b| b.is_ascii_alphabetic())
            .map(|b| b.to_ascii_uppercase())
            .collect::<Vec<u8>>();
        let reply = match e {
            E::UnknownCommand | E::NeedsMoreData { .. } => {
                "502 5.5.2 Error: command not recognized".to_string()
            }
            E::InvalidSenderAddress => "501 5.1.7 Bad sender address syntax".to_string(),
            E::InvalidRecipientAddress => "501 5.1.3 Bad recipient address syntax".to_string(),
            E::SyntaxError { syntax } => format!("501 5.5.4 Syntax: {syntax}"),
            E::InvalidParameter { param } => format!("501 5.5.4 Bad {param} parameter"),
            E::UnsupportedParameter { param } => {
                let param: String = param
                    .chars()
                    .filter(|c| c.is_ascii_graphic())
                    .take(40)
                    .collect();
                format!("555 5.5.4 Unsupported option: {param}")
            }
            E::ResponseTooLong | E::InvalidResponse { .. } => {
                "502 5.5.2 Error: command not recognized".to_string()
            }
        };
        // smtp-proto refuses a SIZE too large for a usize: still a size.
        if verb == b"MAIL"
            && declared_size(line).is_some_and(|n| n > self.cfg.max_message_size as u128)
        {
            self.reply("552 5.3.4 Message size exceeds fixed limit");
            return;
        }
        // A bare verb that needs arguments reads better with its syntax.
        let reply = match (verb.as_slice(), reply.starts_with("502")) {
            (b"HELO", true) => "501 5.5.4 Syntax: HELO hostname".to_string(),
            (b"EHLO", true) => "501 5.5.4 Syntax: EHLO hostname".to_string(),
            _ => reply,
        };
        self.error(&reply);
    }

    fn hello(&mut self, host: Cow<'_, str>, esmtp: bool) {
        let name = host.trim().to_string();
        if name.is_empty() || name.len() > 255 || name.bytes().any(|b| !b.is_ascii_graphic()) {
            self.error("501 5.5.4 Syntax: EHLO hostname");
            return;
        }
        self.helo = Some(name);
        self.esmtp = esmtp;
        self.tx = None;
        let host = self.cfg.hostname.clone();
        if !esmtp {
            self.reply(&format!("250 {host}"));
            return;
        }
        let mut lines = vec![
            host,
            "PIPELINING".to_string(),
            format!("SIZE {}", self.cfg.max_message_size),
            "8BITMIME".to_string(),
            "ENHANCEDSTATUSCODES".to_string(),
            "SMTPUTF8".to_string(),
        ];
        if self.cfg.tls_available && !self.tls {
            lines.push("STARTTLS".to_string());
        }
        let last = lines.len() - 1;
        for (i, l) in lines.iter().enumerate() {
            let sep = if i == last { ' ' } else { '-' };
            self.output
                .extend_from_slice(format!("250{sep}{l}\r\n").as_bytes());
        }
    }

    /// `declared` is the `SIZE=` value as written (smtp-proto wraps huge ones).
    fn mail(&mut self, from: smtp_proto::MailFrom<Cow<'_, str>>, declared: Option<u128>) {
        if self.helo.is_none() {
            self.error("503 5.5.1 Error: send HELO/EHLO first");
            return;
        }
        if self.tx.is_some() {
            self.error("503 5.5.1 Error: nested MAIL command");
            return;
        }
        let parsed = match from.size {
            usize::MAX => 0,
            n => n as u128,
        };
        if declared.unwrap_or(0).max(parsed) > self.cfg.max_message_size as u128 {
            self.reply("552 5.3.4 Message size exceeds fixed limit");
            return;
        }
        let sender = wire_form(&from.address).into_owned();
        if !sender.is_empty() && !valid_mailbox(&sender) {
            self.error("501 5.1.7 Bad sender address syntax");
            return;
        }
        let smtputf8 = from.flags & MAIL_SMTPUTF8 != 0;
        if !smtputf8 && !sender.is_ascii() {
            self.error("553 5.6.7 Error: non-ASCII sender address needs SMTPUTF8");
            return;
        }
        // What the relay client would refuse to send (a local part over 64
        // octets, ...) is refused now, not bounced later.
        if let Err(why) = crate::relay::deliver::check_address(&sender, true) {
            self.error(&format!(
                "553 5.1.7 <{sender}>: Sender address rejected: {why}"
            ));
            return;
        }
        self.tx = Some(Transaction {
            sender,
            recipients: Vec::new(),
            smtputf8,
            eight_bit: from.flags & MAIL_BODY_8BITMIME != 0,
        });
        self.reply("250 2.1.0 Ok");
    }

    fn rcpt(&mut self, address: Cow<'_, str>) -> Option<Event> {
        let Some(tx) = self.tx.as_ref() else {
            self.error("503 5.5.1 Error: need MAIL command");
            return None;
        };
        if tx.recipients.len() >= self.cfg.max_recipients {
            self.reply("452 4.5.3 Error: too many recipients");
            return None;
        }
        let smtputf8 = tx.smtputf8;
        let address = wire_form(&address).into_owned();
        if !valid_mailbox(&address) {
            self.error("501 5.1.3 Bad recipient address syntax");
            return None;
        }
        if !smtputf8 && !address.is_ascii() {
            self.error("553 5.6.7 Error: non-ASCII recipient address needs SMTPUTF8");
            return None;
        }
        // The relay client's own check: an address it would refuse to send
        // to is refused here, instead of being accepted and then bounced by
        // the node itself.
        if let Err(why) = crate::relay::deliver::check_address(&address, false) {
            self.error(&format!(
                "553 5.1.3 <{address}>: Recipient address rejected: {why}"
            ));
            return None;
        }
        let domain = address.rsplit_once('@').map(|(_, d)| d).unwrap_or_default();
        let domain = crate::names::normalize_name(domain);
        self.pending = Pending::Recipient;
        self.pending_rcpt = Some(address.clone());
        Some(Event::Recipient { address, domain })
    }

    fn data(&mut self) -> Option<Event> {
        match &self.tx {
            None => self.error("503 5.5.1 Error: need RCPT command"),
            Some(tx) if tx.recipients.is_empty() => {
                self.error("554 5.5.1 Error: no valid recipients")
            }
            Some(_) => {
                // The first buffer is reserved before DATA is accepted: with
                // the budget spent, nothing is read that cannot be stored.
                let first = DataReader::initial_capacity(self.cfg.max_message_size);
                let Some(memory) = self.cfg.data_memory.reserve(first) else {
                    self.reply("452 4.3.1 Insufficient system storage");
                    return None;
                };
                self.reply("354 End data with <CR><LF>.<CR><LF>");
                self.data_phases += 1;
                self.data = Some(
                    DataReader::new(self.cfg.max_line_length, self.cfg.max_message_size)
                        .with_memory(memory),
                );
            }
        }
        None
    }

    fn starttls(&mut self) -> Option<Event> {
        if self.tls {
            self.error("554 5.5.1 Error: TLS already active");
            return None;
        }
        if !self.cfg.tls_available {
            self.error("502 5.5.1 Error: command not implemented");
            return None;
        }
        if !self.pending_input().is_empty() {
            // Plain-text commands pipelined behind STARTTLS would be taken as
            // if they came through TLS (CVE-2011-0411). Refuse and end.
            self.reply("554 5.5.1 Error: commands pipelined after STARTTLS");
            self.clear_input();
            self.closed = true;
            return Some(Event::Close);
        }
        self.reply("220 2.0.0 Ready to start TLS");
        Some(Event::StartTls)
    }
}

/// The `SIZE=` parameter of a MAIL line, as written, saturating (smtp-proto
/// wraps values past `usize::MAX` around).
fn declared_size(line: &[u8]) -> Option<u128> {
    let end = line.iter().position(|&b| b == b'>')?;
    let params = &line[end + 1..];
    let at = params
        .windows(6)
        .position(|w| w.eq_ignore_ascii_case(b" SIZE="))?;
    let digits = &params[at + 6..];
    let len = digits.iter().take_while(|b| b.is_ascii_digit()).count();
    (len > 0).then(|| {
        digits[..len].iter().fold(0u128, |n, d| {
            n.saturating_mul(10).saturating_add(u128::from(d - b'0'))
        })
    })
}

/// A line that is no SMTP command: an HTTP method, or a first word with
/// bytes that are not letters (TLS, binary, another protocol). A blank line
/// or a mistyped verb is an ordinary command error.
fn is_non_smtp(line: &[u8]) -> bool {
    const HTTP: [&[u8]; 9] = [
        b"GET", b"POST", b"CONNECT", b"HEAD", b"PUT", b"OPTIONS", b"DELETE", b"PATCH", b"TRACE",
    ];
    let end = line
        .iter()
        .position(|b| matches!(b, b' ' | b'\r' | b'\n'))
        .unwrap_or(line.len());
    let verb = &line[..end];
    !verb.is_empty()
        && (!verb.iter().all(u8::is_ascii_alphabetic)
            || HTTP.iter().any(|m| verb.eq_ignore_ascii_case(m)))
}

/// Longest address taken (smtp-proto's limit; RFC 5321 4.5.3.1.3 allows
/// a 256-octet path, brackets included).
const MAX_ADDRESS_LEN: usize = 256;

/// Stands in for the n-th address literal while smtp-proto parses the line.
/// Private-use code points: smtp-proto takes them as atext, and no real
/// address contains them.
const LITERAL_MARK: char = '\u{E000}';

/// smtp-proto does not parse address literals (`user@[192.0.2.1]`,
/// `@[192.0.2.1]:user@host`), which RFC 5321 allows and Postfix accepts.
/// In a MAIL or RCPT line, each IP address literal after an `@` (outside
/// quotes, ending the domain) is replaced by a marker that parses as a
/// domain; [`unmask`] puts it back. A line that holds the marker itself is
/// left alone (and fails to parse, as before).
fn mask_address_literals(line: &[u8]) -> (Cow<'_, [u8]>, Vec<&[u8]>) {
    // Cheapest test first: this runs on every command line.
    if !line.contains(&b'[') {
        return (Cow::Borrowed(line), Vec::new());
    }
    let verb = line.get(..4).unwrap_or_default();
    let mut mark_bytes = [0u8; 4];
    let mark_bytes = LITERAL_MARK.encode_utf8(&mut mark_bytes).as_bytes();
    if !(verb.eq_ignore_ascii_case(b"MAIL") || verb.eq_ignore_ascii_case(b"RCPT"))
        || line.windows(mark_bytes.len()).any(|w| w == mark_bytes)
    {
        return (Cow::Borrowed(line), Vec::new());
    }
    let mut out = Vec::with_capacity(line.len());
    let mut literals = Vec::new();
    let mut in_quote = false;
    let mut i = 0;
    while i < line.len() {
        let b = line[i];
        if in_quote && b == b'\\' {
            // A quoted pair: the next byte is taken as is.
            out.extend_from_slice(&line[i..(i + 2).min(line.len())]);
            i += 2;
            continue;
        }
        if b == b'"' {
            in_quote = !in_quote;
        }
        if b == b'[' && !in_quote && i > 0 && line[i - 1] == b'@' {
            if let Some(lit) = address_literal_at(&line[i..]) {
                let mark = format!("{LITERAL_MARK}{}", literals.len());
                out.extend_from_slice(mark.as_bytes());
                literals.push(lit);
                i += lit.len();
                continue;
            }
        }
        out.push(b);
        i += 1;
    }
    (Cow::Owned(out), literals)
}

/// The IP address literal at the start of `rest` (`[...]`), if it is one
/// and it ends the domain (`>`, or `:` / `,` in a source route).
fn address_literal_at(rest: &[u8]) -> Option<&[u8]> {
    let end = rest.iter().position(|&c| c == b']')?;
    let lit = &rest[..=end];
    let text = std::str::from_utf8(lit).ok()?;
    crate::dns::ip_literal(text)?;
    matches!(rest.get(end + 1), Some(b'>' | b':' | b',')).then_some(lit)
}

fn unmask<'a>(address: Cow<'a, str>, literals: &[&[u8]]) -> Cow<'a, str> {
    if literals.is_empty() || !address.contains(LITERAL_MARK) {
        return address;
    }
    let mut s = address.into_owned();
    // Highest first, so that marker 1 is not taken for the start of 10.
    for (n, lit) in literals.iter().enumerate().rev() {
        s = s.replace(&format!("{LITERAL_MARK}{n}"), &String::from_utf8_lossy(lit));
    }
    Cow::Owned(s)
}

/// The address as it goes on the wire: smtp-proto hands out a quoted local
/// part unquoted (`"u v"@e.test` as `u v@e.test`), which no one could send
/// again; a local part that is not a dot-atom is quoted back (RFC 5321
/// 4.1.2), so the spool, the relay and the checks all see the real address.
fn wire_form(address: &str) -> Cow<'_, str> {
    let Some((local, domain)) = address.rsplit_once('@') else {
        return Cow::Borrowed(address);
    };
    let atext =
        |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii();
    if !local.is_empty()
        && local
            .split('.')
            .all(|atom| !atom.is_empty() && atom.chars().all(atext))
    {
        return Cow::Borrowed(address);
    }
    let mut quoted = String::with_capacity(address.len() + 4);
    quoted.push('"');
    for c in local.chars() {
        if c == '"' || c == '\\' {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('"');
    quoted.push('@');
    quoted.push_str(domain);
    Cow::Owned(quoted)
}

/// `local@domain` with a non-empty local part and a plausible domain
/// (smtp-proto has already checked the path syntax, but lets control
/// characters through in a quoted local part; RFC 5321 allows none, and the
/// address goes into replies, the `Received:` header and the logs).
fn valid_mailbox(address: &str) -> bool {
    let Some((local, domain)) = address.rsplit_once('@') else {
        return false;
    };
    !local.is_empty()
        && address.len() <= MAX_ADDRESS_LEN
        && !address.chars().any(char::is_control)
        && !domain.is_empty()
        && !domain.starts_with('.')
        && !domain.contains("..")
        && domain.chars().all(|c| {
            c.is_alphanumeric() || c == '.' || c == '-' || c == '[' || c == ']' || c == ':'
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> SessionConfig {
        SessionConfig {
            hostname: "mx.magic.test".into(),
            max_line_length: 1000,
            max_message_size: 1000,
            max_recipients: 2,
            max_errors: 10,
            junk_command_limit: 100,
            max_received_headers: 3,
            tls_available: true,
            data_memory: MemoryBudget::unlimited(),
        }
    }

    fn new() -> Session {
        let mut s = Session::new(cfg(), "192.0.2.1".parse().unwrap(), false);
        s.greeting();
        s
    }

    fn out(s: &mut Session) -> String {
        String::from_utf8(s.take_output()).unwrap()
    }

    /// Drives the session, accepting every recipient and storing every message.
    fn drive(s: &mut Session, input: &[u8]) -> (String, Vec<Message>, Event) {
        s.receive(input);
        let mut messages = Vec::new();
        loop {
            match s.next_event() {
                Event::Recipient { .. } => s.recipient_verdict(Verdict::Accept),
                Event::Message(m) => {
                    messages.push(*m);
                    s.message_stored(Ok("Q1"));
                }
                Event::ProtocolTest(_) => {}
                e => return (out(s), messages, e),
            }
        }
    }

    #[test]
    fn full_transaction_pipelined() {
        let mut s = new();
        let (o, msgs, e) = drive(
            &mut s,
            b"EHLO client.test\r\nMAIL FROM:<a@b.test> BODY=8BITMIME\r\nRCPT TO:<u@example.test>\r\nDATA\r\nhi\r\n..dot\r\n.\r\nQUIT\r\n",
        );
        assert_eq!(e, Event::Close);
        assert!(o.starts_with("220 mx.magic.test ESMTP"), "{o}");
        assert!(o.contains("250-PIPELINING\r\n250-SIZE 1000\r\n"), "{o}");
        assert!(o.contains("250 STARTTLS\r\n"), "{o}");
        assert!(o.contains("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 "), "{o}");
        assert!(
            o.ends_with("250 2.0.0 Ok: queued as Q1\r\n221 2.0.0 Bye\r\n"),
            "{o}"
        );
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].body, b"hi\r\n.dot\r\n");
        assert_eq!(msgs[0].sender, "a@b.test");
        assert!(msgs[0].eight_bit);
        assert_eq!(msgs[0].recipients, vec!["u@example.test"]);
    }

    #[test]
    fn every_split_gives_the_same_replies() {
        let input: &[u8] = b"HELO c.test\r\nMAIL FROM:<>\r\nRCPT TO:<u@example.test>\r\nDATA\r\nx\r\n.\r\nNOOP\r\n";
        let mut whole = new();
        let (expected, _, _) = drive(&mut whole, input);
        for cut in 0..input.len() {
            let mut s = new();
            let (mut got, _, _) = drive(&mut s, &input[..cut]);
            got += &drive(&mut s, &input[cut..]).0;
            assert_eq!(got, expected, "split at {cut}");
        }
    }

    #[test]
    fn order_of_commands_is_enforced() {
        let mut s = new();
        let (o, _, _) = drive(&mut s, b"MAIL FROM:<a@b.test>\r\n");
        assert!(
            o.ends_with("503 5.5.1 Error: send HELO/EHLO first\r\n"),
            "{o}"
        );
        let (o, _, _) = drive(&mut s, b"EHLO c\r\nRCPT TO:<u@example.test>\r\nDATA\r\n");
        assert!(o.contains("503 5.5.1 Error: need MAIL command"), "{o}");
        assert!(o.ends_with("503 5.5.1 Error: need RCPT command\r\n"), "{o}");
        let (o, _, _) = drive(
            &mut s,
            b"MAIL FROM:<a@b.test>\r\nMAIL FROM:<a@b.test>\r\nDATA\r\n",
        );
        assert!(o.contains("503 5.5.1 Error: nested MAIL command"), "{o}");
        assert!(
            o.ends_with("554 5.5.1 Error: no valid recipients\r\n"),
            "{o}"
        );
    }

    #[test]
    fn limits() {
        let mut s = new();
        let (o, _, _) = drive(
            &mut s,
            b"EHLO c\r\nMAIL FROM:<a@b.test> SIZE=5000\r\nMAIL FROM:<a@b.test> SIZE=500\r\nRCPT TO:<1@e.test>\r\nRCPT TO:<2@e.test>\r\nRCPT TO:<3@e.test>\r\n",
        );
        assert!(o.contains("552 5.3.4"), "{o}");
        assert!(
            o.ends_with("250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n452 4.5.3 Error: too many recipients\r\n"),
            "{o}"
        );
        let mut long = b"NOOP ".to_vec();
        long.extend(std::iter::repeat_n(b'x', 2000));
        long.extend_from_slice(b"\r\nNOOP\r\n");
        let (o, _, _) = drive(&mut s, &long);
        assert!(
            o.ends_with("500 5.5.2 Error: line too long\r\n250 2.0.0 Ok\r\n"),
            "{o}"
        );
    }

    #[test]
    fn bad_data_is_refused_and_session_continues() {
        let mut s = new();
        let (o, msgs, _) = drive(
            &mut s,
            b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@e.test>\r\nDATA\r\nx\n.\nMAIL FROM:<evil@x>\r\n.\r\nNOOP\r\n",
        );
        assert!(msgs.is_empty());
        assert!(o.ends_with("354 End data with <CR><LF>.<CR><LF>\r\n554 5.6.0 Error: bare <LF> received; lines must end with <CR><LF>\r\n250 2.0.0 Ok\r\n"), "{o}");
    }

    #[test]
    fn loops_are_refused() {
        let mut s = new();
        let (o, msgs, _) = drive(
            &mut s,
            b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@e.test>\r\nDATA\r\nReceived: a\r\nreceived: b\r\nRECEIVED: c\r\nReceived: d\r\n\r\nbody\r\n.\r\n",
        );
        assert!(msgs.is_empty());
        assert!(
            o.ends_with("554 5.4.6 Error: too many hops (mail loop?)\r\n"),
            "{o}"
        );
    }

    #[test]
    fn starttls_with_pipelined_command_is_refused() {
        let mut s = new();
        let (o, _, e) = drive(&mut s, b"EHLO c\r\nSTARTTLS\r\nNOOP\r\n");
        assert_eq!(e, Event::Close);
        assert!(
            o.ends_with("554 5.5.1 Error: commands pipelined after STARTTLS\r\n"),
            "{o}"
        );
        assert!(!o.contains("250 2.0.0 Ok"), "{o}");
        let mut s = new();
        let (o, _, e) = drive(&mut s, b"EHLO c\r\nSTARTTLS\r\n");
        assert_eq!(e, Event::StartTls);
        assert!(o.ends_with("220 2.0.0 Ready to start TLS\r\n"), "{o}");
        s.tls_started();
        let (o, _, _) = drive(&mut s, b"MAIL FROM:<a@b.test>\r\nEHLO c\r\n");
        assert!(
            o.starts_with("503 5.5.1 Error: send HELO/EHLO first"),
            "{o}"
        );
        assert!(!o.contains("STARTTLS"), "{o}");
    }

    /// The first event that is not a request for more input.
    fn first_event(s: &mut Session) -> Event {
        loop {
            match s.next_event() {
                Event::NeedInput | Event::ProtocolTest(_) => continue,
                e => return e,
            }
        }
    }

    #[test]
    fn address_literals_parse_as_in_postfix() {
        let mut s = new();
        s.receive(b"EHLO c\r\nMAIL FROM:<a@[192.0.2.1]>\r\nRCPT TO:<@[192.0.2.9]:u@[IPv6:2001:db8::1]>\r\n");
        let e = first_event(&mut s);
        assert_eq!(
            e,
            Event::Recipient {
                address: "u@[IPv6:2001:db8::1]".into(),
                domain: "[ipv6:2001:db8::1]".into()
            }
        );
        s.recipient_verdict(Verdict::Accept);
        let o = out(&mut s);
        assert!(o.contains("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"), "{o}");
        assert_eq!(s.tx.as_ref().unwrap().sender, "a@[192.0.2.1]");
        // A bracket that is not an IP literal ending the domain stays a
        // syntax error, and so does a line with the marker in it.
        s.receive(b"RSET\r\n");
        let bad: [&[u8]; 8] = [
            b"MAIL FROM:<a@[192.0.2.1>",
            b"MAIL FROM:<a@[x y]>",
            b"MAIL FROM:<a@[192.0.2.1]x>",
            b"MAIL FROM:<a@[192.0.2.1].example>",
            b"MAIL FROM:<a@[]>",
            b"MAIL FROM:<a@[foo]>",
            b"MAIL FROM:<a@[2001:db8::1]>",
            "MAIL FROM:<\u{E000}0@[192.0.2.1]>".as_bytes(),
        ];
        for line in bad {
            s.receive(line);
            s.receive(b"\r\n");
        }
        let long = format!("MAIL FROM:<{}@[192.0.2.1]>\r\n", "a".repeat(250));
        s.receive(long.as_bytes());
        assert_eq!(s.next_event(), Event::NeedInput);
        let o = out(&mut s);
        assert_eq!(o.matches("501 5.1.7").count(), 9, "{o}");
    }

    #[test]
    fn non_smtp_lines_end_the_session_at_once() {
        for line in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"post /form HTTP/1.0\r\n",
            b"CONNECT mx.test:25 HTTP/1.1\r\n",
            b"HEAD / HTTP/1.1\r\n",
            b"PUT /x HTTP/1.1\r\n",
            b"\x16\x03\x01\x02\x00\x01\r\n",
            b"EHLO\x00x\r\n",
        ] {
            let mut s = new();
            let mut input = line.to_vec();
            input.extend_from_slice(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n");
            s.receive(&input);
            assert_eq!(s.next_event(), Event::ProtocolTest(ProtocolTest::NonSmtp));
            assert_eq!(s.next_event(), Event::Close);
            let o = out(&mut s);
            assert!(
                o.ends_with("521 5.5.1 Protocol error: not an SMTP command\r\n"),
                "{o}"
            );
            assert!(!o.contains("250"), "nothing after it is served: {o}");
        }
        // A mistyped verb or a blank line is an ordinary error.
        let (o, _, e) = drive(&mut new(), b"EHOL c\r\n\r\nNOOP\r\n");
        assert_eq!(e, Event::NeedInput);
        assert!(o.ends_with("250 2.0.0 Ok\r\n"), "{o}");
    }

    #[test]
    fn unoffered_pipelining_is_reported_once() {
        // One command at a time after EHLO's reply: fine, pipelined after it too.
        let mut s = new();
        s.receive(b"EHLO c\r\n");
        assert_eq!(s.next_event(), Event::NeedInput);
        s.receive(b"MAIL FROM:<a@b.test>\r\nRSET\r\nNOOP\r\n");
        assert_eq!(s.next_event(), Event::NeedInput);
        // After HELO nothing may be pipelined.
        let mut s = new();
        s.receive(b"HELO c\r\n");
        assert_eq!(s.next_event(), Event::NeedInput);
        s.receive(b"MAIL FROM:<a@b.test>\r\n");
        assert_eq!(s.next_event(), Event::NeedInput);
        s.receive(b"RSET\r\nNOOP\r\nNOOP\r\n");
        assert_eq!(
            s.next_event(),
            Event::ProtocolTest(ProtocolTest::Pipelining)
        );
        assert_eq!(s.next_event(), Event::NeedInput, "reported once");
        let o = out(&mut s);
        assert_eq!(o.matches("250 2.0.0 Ok").count(), 3, "still served: {o}");
    }

    #[test]
    fn huge_sizes_are_over_the_limit() {
        let mut s = new();
        s.receive(b"EHLO c\r\nMAIL FROM:<a@b.test> SIZE=18446744073709551615\r\nMAIL FROM:<a@b.test> SIZE=184467440737095516150\r\nMAIL FROM:<a@b.test> SIZE=100 BODY=8BITMIME\r\n");
        // Sent before the EHLO reply: the pipelining test fails first.
        assert_eq!(
            s.next_event(),
            Event::ProtocolTest(ProtocolTest::Pipelining)
        );
        assert_eq!(s.next_event(), Event::NeedInput);
        let o = out(&mut s);
        assert_eq!(o.matches("552 5.3.4").count(), 2, "{o}");
        assert!(o.ends_with("250 2.1.0 Ok\r\n"), "{o}");
        assert_eq!(declared_size(b"MAIL FROM:<a@b> size=7"), Some(7));
        assert_eq!(declared_size(b"MAIL FROM:<a@b>"), None);
    }

    #[test]
    fn literal_masks_do_not_touch_other_lines() {
        let (m, l) = mask_address_literals(b"EHLO [192.0.2.1]");
        assert_eq!(&*m, b"EHLO [192.0.2.1]");
        assert!(l.is_empty());
        let (m, l) = mask_address_literals(b"RCPT TO:<\"x@[1.2.3.4]\"@example.test>");
        assert_eq!(&*m, b"RCPT TO:<\"x@[1.2.3.4]\"@example.test>");
        assert!(l.is_empty());
        // An escaped backslash does not end the quoted string early.
        let (m, l) = mask_address_literals(b"MAIL FROM:<\"a\\\\\"@[1.2.3.4]>");
        assert_eq!(l, [b"[1.2.3.4]".as_slice()]);
        assert!(!m.contains(&b'['));
        let (m, l) = mask_address_literals(b"mail from:<a@[1.2.3.4]> SIZE=10");
        assert_eq!(l, [b"[1.2.3.4]".as_slice()]);
        assert!(!m.contains(&b'['));
    }

    #[test]
    fn refused_recipient_and_other_commands() {
        let mut s = new();
        s.receive(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@elsewhere.test>\r\nVRFY x\r\nHELP\r\nEXPN x\r\nFOO\r\n");
        let e = first_event(&mut s);
        assert_eq!(
            e,
            Event::Recipient {
                address: "u@elsewhere.test".into(),
                domain: "elsewhere.test".into()
            }
        );
        s.recipient_verdict(Verdict::Refuse(
            "550 5.7.1 <u@elsewhere.test>: relaying denied".into(),
        ));
        assert_eq!(s.next_event(), Event::NeedInput);
        let o = out(&mut s);
        assert!(
            o.contains("550 5.7.1 <u@elsewhere.test>: relaying denied\r\n252 "),
            "{o}"
        );
        assert!(o.contains("214 2.0.0"), "{o}");
        assert!(o.contains("502 5.5.1"), "{o}");
        assert!(
            o.ends_with("502 5.5.2 Error: command not recognized\r\n"),
            "{o}"
        );
    }

    #[test]
    fn bare_cr_and_nul_in_commands_are_refused() {
        let mut s = new();
        let (o, _, e) = drive(
            &mut s,
            b"EHLO a\rX: y\r\nHELO b\0c\r\nEHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@exam\rple.test>\r\nRCPT TO:<u@e\0.test>\r\nNOOP\r\r\n",
        );
        assert_eq!(e, Event::NeedInput);
        let lines: Vec<&str> = o.split("\r\n").collect();
        assert!(lines[0].starts_with("220 "), "{o}");
        assert_eq!(lines[1], "501 5.5.2 Error: bare <CR> received in command");
        assert_eq!(lines[2], "501 5.5.2 Error: NUL received in command");
        assert!(o.contains("250 2.1.0 Ok\r\n501 5.5.2 Error: bare <CR> received in command\r\n501 5.1.3 Bad recipient address syntax\r\n501 5.5.2 Error: bare <CR> received in command\r\n"), "{o}");
        assert!(s.helo() == Some("c"), "{:?}", s.helo());
    }

    #[test]
    fn addresses_the_relay_would_refuse_are_refused_at_mail_and_rcpt() {
        let long_local = "l".repeat(65);
        // 253 octets (the most a domain may have), so the address is 255.
        let long_domain = format!("{0}.{0}.{0}.{1}.test", "d".repeat(61), "d".repeat(62));
        assert_eq!(long_domain.len(), 253);
        let input = format!(
            "HELO c\r\nMAIL FROM:<{long_local}@b.test>\r\nMAIL FROM:<a@b.test>\r\n\
             RCPT TO:<{long_local}@e.test>\r\nRCPT TO:<u@{long_domain}>\r\n\
             RCPT TO:<u@{}.test>\r\nRCPT TO:<u@-e.test>\r\nRCPT TO:<{}@e.test>\r\n",
            "d".repeat(64),
            "l".repeat(64)
        );
        let mut s = new();
        let (o, _, e) = drive(&mut s, input.as_bytes());
        assert_eq!(e, Event::NeedInput);
        let lines: Vec<&str> = o.trim_end().split("\r\n").collect();
        assert!(lines[2].starts_with("553 5.1.7 <"), "{o}");
        assert!(lines[2].contains("longer than 64"), "{o}");
        assert_eq!(lines[3], "250 2.1.0 Ok");
        for l in &lines[4..8] {
            assert!(l.starts_with("553 5.1.3 <"), "{l}");
        }
        assert_eq!(lines[8], "250 2.1.5 Ok");
        for (addr, ok) in [
            (format!("{long_local}@e.test"), false),
            ("u@[192.0.2.1]".to_string(), true),
            ("\"a b\"@e.test".to_string(), true),
        ] {
            assert_eq!(
                crate::relay::deliver::check_address(&addr, false).is_ok(),
                ok,
                "{addr}"
            );
        }
    }

    #[test]
    fn quoted_local_parts_are_kept_quoted() {
        assert_eq!(wire_form("a.b+c@e.test"), "a.b+c@e.test");
        assert_eq!(wire_form("u v@e.test"), "\"u v\"@e.test");
        assert_eq!(wire_form("a\"b\\@e.test"), "\"a\\\"b\\\\\"@e.test");
        assert_eq!(wire_form("a..b@e.test"), "\"a..b\"@e.test");
        let mut s = new();
        let (o, msgs, _) = drive(
            &mut s,
            b"EHLO c\r\nMAIL FROM:<\"a b\"@b.test>\r\nRCPT TO:<\"u v\"@e.test>\r\nDATA\r\nx\r\n.\r\n",
        );
        assert!(o.contains("250 2.1.5 Ok\r\n354 "), "{o}");
        assert_eq!(msgs[0].sender, "\"a b\"@b.test");
        assert_eq!(msgs[0].recipients, ["\"u v\"@e.test"]);
    }

    #[test]
    fn junk_commands_past_the_limit_count_as_errors() {
        let mut s = Session::new(
            SessionConfig {
                junk_command_limit: 3,
                max_errors: 2,
                ..cfg()
            },
            "192.0.2.1".parse().unwrap(),
            false,
        );
        s.greeting();
        // Three free, then each one an error: the 5th is the 2nd error.
        let (o, _, e) = drive(
            &mut s,
            b"NOOP\r\nRSET\r\nVRFY x\r\nHELP\r\nNOOP\r\nNOOP\r\n",
        );
        assert_eq!(e, Event::Close);
        assert!(
            o.ends_with("214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP STARTTLS\r\n250 2.0.0 Ok\r\n421 4.7.0 mx.magic.test Error: too many errors\r\n"),
            "{o}"
        );
        assert_eq!(o.matches("250 2.0.0 Ok").count(), 3, "{o}");
        // An accepted message starts the count again.
        let mut s = Session::new(
            SessionConfig {
                junk_command_limit: 2,
                max_errors: 1,
                ..cfg()
            },
            "192.0.2.1".parse().unwrap(),
            false,
        );
        let (_, msgs, e) = drive(
            &mut s,
            b"EHLO c\r\nNOOP\r\nRSET\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@e.test>\r\nDATA\r\nx\r\n.\r\nRSET\r\nNOOP\r\n",
        );
        assert_eq!(msgs.len(), 1);
        assert_eq!(e, Event::NeedInput);
    }

    #[test]
    fn data_memory_is_reserved_and_given_back() {
        let budget = MemoryBudget::new(70_000);
        let cfg = SessionConfig {
            max_message_size: 100_000,
            data_memory: budget.clone(),
            ..cfg()
        };
        let txn = b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@e.test>\r\nDATA\r\n";
        let mut a = Session::new(cfg.clone(), "192.0.2.1".parse().unwrap(), false);
        let mut b = Session::new(cfg.clone(), "192.0.2.2".parse().unwrap(), false);
        let (o, _, _) = drive(&mut a, txn);
        assert!(
            o.ends_with("354 End data with <CR><LF>.<CR><LF>\r\n"),
            "{o}"
        );
        assert_eq!(budget.in_use(), 65_536);
        // The budget cannot hold a second first buffer: 452 at DATA.
        let (o, _, e) = drive(&mut b, txn);
        assert!(
            o.ends_with("452 4.3.1 Insufficient system storage\r\n"),
            "{o}"
        );
        assert_eq!(e, Event::NeedInput);
        // Past the budget mid-body: 452 after the end, nothing stored.
        let mut body = b"x".repeat(998);
        body.extend_from_slice(b"\r\n");
        let body = body.repeat(70);
        a.receive(&body);
        assert_eq!(a.next_event(), Event::NeedInput);
        assert_eq!(budget.in_use(), 0);
        let (o, msgs, _) = drive(&mut a, b".\r\n");
        assert!(msgs.is_empty());
        assert_eq!(o, "452 4.3.1 Insufficient system storage\r\n");
        // Now b gets its DATA; its memory is held until the message is
        // stored, and a session dropped mid-DATA gives it back too.
        let (o, _, _) = drive(&mut b, b"DATA\r\nshort\r\n.\r\n");
        assert!(o.ends_with("250 2.0.0 Ok: queued as Q1\r\n"), "{o}");
        assert_eq!(budget.in_use(), 0);
        drive(
            &mut b,
            b"MAIL FROM:<a@b.test>\r\nRCPT TO:<u@e.test>\r\nDATA\r\nxx",
        );
        assert_eq!(budget.in_use(), 65_536);
        drop(b);
        assert_eq!(budget.in_use(), 0);
    }

    #[test]
    fn too_many_errors_closes() {
        let mut s = new();
        let (o, _, e) = drive(
            &mut s,
            b"A
B
C
D
E
F
G
H
I
J
K
",
        );
        assert_eq!(e, Event::Close);
        assert!(
            o.ends_with("421 4.7.0 mx.magic.test Error: too many errors\r\n"),
            "{o}"
        );
    }

    #[test]
    fn counts_received_in_header_only() {
        assert_eq!(
            crate::hops::count_received(
                b"Received: a\r\nX: y\r\nreceived: b\r\n\r\nReceived: body\r\n"
            ),
            2
        );
        assert_eq!(crate::hops::count_received(b""), 0);
    }

    #[test]
    fn a_long_line_that_is_one_error_too_many_closes() {
        let mut s = Session::new(
            SessionConfig {
                max_errors: 1,
                ..cfg()
            },
            "192.0.2.1".parse().unwrap(),
            false,
        );
        let (o, _, e) = drive(&mut s, &[b'x'; 1500]);
        assert_eq!(e, Event::Close);
        assert!(
            o.ends_with("500 5.5.2 Error: line too long\r\n421 4.7.0 mx.magic.test Error: too many errors\r\n"),
            "{o}"
        );
    }

    #[test]
    fn control_characters_in_addresses_are_refused() {
        let mut s = new();
        let (o, _, e) = drive(
            &mut s,
            b"EHLO c\r\nMAIL FROM:<\"a\x1b[2J\"@b.test>\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<\"u\0\tx\"@e.test>\r\nRCPT TO:<\"u v\"@e.test>\r\n",
        );
        assert_eq!(e, Event::NeedInput);
        assert!(
            o.contains("501 5.1.7 Bad sender address syntax\r\n250 2.1.0 Ok\r\n"),
            "{o}"
        );
        assert!(
            o.ends_with("501 5.1.3 Bad recipient address syntax\r\n250 2.1.5 Ok\r\n"),
            "{o}"
        );
    }

    // Property tests: whatever a client sends, the session neither panics nor
    // loops, answers only with well-formed reply lines, keeps its input
    // buffer bounded and hands out only clean addresses and bodies.

    use proptest::prelude::*;

    const PIECES: &[&[u8]] = &[
        b"EHLO client.test\r\n",
        b"HELO c\r\n",
        b"EHLO\r\n",
        b"HELO \t \r\n",
        b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@e.test>\r\nDATA\r\n",
        b"MAIL FROM:<a@b.test>\r\n",
        b"MAIL FROM:<>\r\n",
        b"MAIL FROM:<a@b.test> BODY=8BITMIME SMTPUTF8\r\n",
        b"MAIL FROM:<a@b.test> SIZE=999999999999999999999999999\r\n",
        b"MAIL FROM:<a@b.test> SIZE=-1\r\n",
        b"MAIL FROM:<a@b.test> HOLDFOR=18446744073709551616 MT-PRIORITY=-99999999999999\r\n",
        b"MAIL FROM:<a@b.test> HOLDUNTIL=4294967295-99-99T99:99:99+99:99 BY=-9999999999999999999;R\r\n",
        b"MAIL FROM:<a@b.test> RET=HDRS ENVID=x+2Bq MTRK=x:1 REQUIRETLS X=\xff\r\n",
        b"MAIL FROM:<\xc3\xa9@\xc3\xa9.test> SMTPUTF8\r\n",
        b"RCPT TO:<u@example.test>\r\n",
        b"RCPT TO:<\"a\\\"b\\\\\"@e.test>\r\n",
        b"RCPT TO:<\"\0\x1b\t\"@e.test>\r\n",
        b"RCPT TO:<@r1,@r2:u@e.test>\r\n",
        b"RCPT TO:<postmaster>\r\n",
        b"RCPT TO:<u@[192.0.2.1]>\r\n",
        b"RCPT TO:<u@e.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;u@e.test\r\n",
        b"DATA\r\n",
        b".\r\n",
        b"..\r\n",
        b"x\r\n.\r\n",
        b"\r\n.\r\n",
        b"\n.\n",
        b"\r.\r\n",
        b".\r\r\n",
        b"Received: x\r\n",
        b"RSET\r\n",
        b"NOOP\r\n",
        b"QUIT\r\n",
        b"STARTTLS\r\n",
        b"VRFY u\r\n",
        b"EXPN u\r\n",
        b"HELP\r\n",
        b"AUTH PLAIN AGF1AHA=\r\n",
        b"BDAT 10 LAST\r\n",
        b"BDAT 99999999999999999999999\r\n",
        b"ETRN x\r\n",
        b"ATRN a,b\r\n",
        b"BURL imap://x LAST\r\n",
        b"LHLO x\r\n",
        b"\r\n",
        b"\n",
        b"\r",
        b"\0\0\r\n",
        b"\xff\xfe\x80\r\n",
    ];

    /// Commands, near-misses, garbage (NULs and 8-bit bytes included) and
    /// over-long lines.
    fn arb_piece() -> impl Strategy<Value = Vec<u8>> {
        let specials = vec![
            b'\r', b'\n', b'.', b' ', b':', b'<', b'>', b'@', b'"', b'\\', b'=', b'a', 0, 0xff,
        ];
        let transaction = (
            proptest::sample::select(vec![&b"EHLO c\r\n"[..], b"HELO c\r\n", b"RSET\r\n", b""]),
            proptest::sample::select(vec![
                &b"MAIL FROM:<a@b.test>\r\n"[..],
                b"MAIL FROM:<> BODY=8BITMIME\r\n",
                b"MAIL FROM:<\xc3\xa9@b.test> SMTPUTF8\r\n",
            ]),
            1usize..4,
            proptest::sample::select(vec![
                &b"x\r\n.\r\n"[..],
                b".\r\n",
                b"Received: a\r\nReceived: b\r\n\r\n..dot\r\n.\r\n",
                b"\xff\0\r\n\r\n.\r\n",
                b"a\nb\r\n.\r\n",
                b"",
            ]),
        )
            .prop_map(|(hello, mail, rcpts, data)| {
                let mut t = [hello, mail].concat();
                for i in 0..rcpts {
                    t.extend_from_slice(format!("RCPT TO:<u{i}@e.test>\r\n").as_bytes());
                }
                t.extend_from_slice(b"DATA\r\n");
                t.extend_from_slice(data);
                t
            });
        prop_oneof![
            2 => transaction,
            5 => proptest::sample::select(PIECES).prop_map(<[u8]>::to_vec),
            2 => proptest::collection::vec(any::<u8>(), 0..40),
            2 => proptest::collection::vec(proptest::sample::select(specials), 0..40),
            1 => (any::<u8>(), 0usize..2500).prop_map(|(b, n)| vec![b; n]),
        ]
    }

    fn arb_cfg() -> impl Strategy<Value = SessionConfig> {
        (
            (
                prop_oneof![Just(1000usize), 1usize..1200],
                prop_oneof![Just(1000usize), 0usize..3000],
                prop_oneof![Just(100usize), 0usize..4],
                prop_oneof![Just(1000usize), 0usize..20],
                0usize..4,
                any::<bool>(),
            ),
            prop_oneof![Just(100usize), 0usize..4],
            prop_oneof![Just(usize::MAX), 0usize..3000],
        )
            .prop_map(
                |((line, size, rcpts, errors, received, tls), junk, memory)| SessionConfig {
                    hostname: "mx.magic.test".into(),
                    junk_command_limit: junk,
                    data_memory: MemoryBudget::new(memory),
                    max_line_length: line,
                    max_message_size: size,
                    max_recipients: rcpts,
                    max_errors: errors,
                    max_received_headers: received,
                    tls_available: tls,
                },
            )
    }

    /// Reply lines only: `ddd` then ` ` or `-`, CRLF-terminated, no stray CR
    /// or LF; a `-` line is followed by a line of the same code.
    fn check_replies(out: &[u8]) {
        let text = std::str::from_utf8(out).expect("replies are UTF-8");
        if text.is_empty() {
            return;
        }
        assert!(text.ends_with("\r\n"), "unterminated reply: {text:?}");
        let lines: Vec<&str> = text[..text.len() - 2].split("\r\n").collect();
        for (i, line) in lines.iter().enumerate() {
            let b = line.as_bytes();
            assert!(
                b.len() >= 4
                    && (b'2'..=b'5').contains(&b[0])
                    && b[1..3].iter().all(u8::is_ascii_digit)
                    && (b[3] == b' ' || b[3] == b'-'),
                "bad reply line {line:?} in {text:?}"
            );
            assert!(!line.contains(['\r', '\n']), "stray CR/LF in {line:?}");
            if b[3] == b'-' {
                let next = lines.get(i + 1).map(|l| l.as_bytes());
                assert_eq!(
                    next.and_then(|n| n.get(..3)),
                    Some(&b[..3]),
                    "unfinished multi-line reply in {text:?}"
                );
            }
        }
    }

    /// What a run of the session produced.
    #[derive(Debug, PartialEq)]
    struct Outcome {
        output: Vec<u8>,
        messages: Vec<Message>,
        ended: bool,
    }

    /// Feeds `pieces` one `receive` each and answers events like the server
    /// does, taking its answers from `choices` (Accept or Refuse, stored or
    /// failed, TLS handshake done or failed).
    fn run(cfg: &SessionConfig, pieces: &[&[u8]], choices: &[bool]) -> Outcome {
        let mut s = Session::new(cfg.clone(), "192.0.2.1".parse().unwrap(), false);
        s.greeting();
        let mut choice = choices.iter().copied().cycle();
        let mut o = Outcome {
            output: Vec::new(),
            messages: Vec::new(),
            ended: false,
        };
        'input: for piece in pieces {
            s.receive(piece);
            for step in 0.. {
                assert!(step < 100_000, "the session does not stop");
                match s.next_event() {
                    Event::NeedInput => {
                        assert!(
                            s.buffered_input_len() < cfg.max_line_length,
                            "{} octets buffered",
                            s.buffered_input_len()
                        );
                        break;
                    }
                    Event::Close => {
                        o.ended = true;
                        break 'input;
                    }
                    Event::ProtocolTest(_) => {}
                    Event::StartTls => {
                        assert!(cfg.tls_available && !s.has_buffered_input());
                        o.output.extend(s.take_output());
                        if choice.next().unwrap_or(true) {
                            s.tls_started();
                        } else {
                            o.ended = true;
                            break 'input;
                        }
                    }
                    Event::Recipient { address, domain } => {
                        assert!(!address.chars().any(char::is_control), "{address:?}");
                        assert!(!domain.is_empty() && !domain.contains(['<', '>', ' ']));
                        if choice.next().unwrap_or(true) {
                            s.recipient_verdict(Verdict::Accept);
                        } else {
                            // As the server words it: the address goes in the reply.
                            s.recipient_verdict(Verdict::Refuse(format!(
                                "550 5.7.1 <{address}>: Relay access denied: relaying denied"
                            )));
                        }
                    }
                    Event::Message(m) => {
                        assert!(!m.recipients.is_empty());
                        assert!(m.recipients.len() <= cfg.max_recipients);
                        assert!(m.body.len() <= cfg.max_message_size);
                        assert!(!crate::relay::deliver::has_bare_cr_or_lf(&m.body));
                        assert!(!m.body.contains(&0));
                        assert!(!m.sender.chars().any(char::is_control));
                        let ok = choice.next().unwrap_or(true);
                        o.messages.push(*m);
                        if ok {
                            s.message_stored(Ok("Q1"));
                        } else {
                            s.message_stored(Err("451 4.3.0 Error: queue file write error"));
                        }
                    }
                }
            }
            o.output.extend(s.take_output());
        }
        o.output.extend(s.take_output());
        drop(s);
        assert_eq!(cfg.data_memory.in_use(), 0, "DATA memory not given back");
        check_replies(&o.output);
        o
    }

    /// `stream` cut at the given positions.
    fn cut<'a>(stream: &'a [u8], cuts: &[proptest::sample::Index]) -> Vec<&'a [u8]> {
        let mut at: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
        at.push(0);
        at.push(stream.len());
        at.sort_unstable();
        at.windows(2).map(|w| &stream[w[0]..w[1]]).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Arbitrary bytes, arbitrarily split.
        #[test]
        fn arbitrary_bytes_never_break_the_session(
            cfg in arb_cfg(),
            stream in proptest::collection::vec(any::<u8>(), 0..4000),
            cuts in proptest::collection::vec(any::<proptest::sample::Index>(), 0..12),
            choices in proptest::collection::vec(any::<bool>(), 1..8),
        ) {
            run(&cfg, &cut(&stream, &cuts), &choices);
        }

        /// Valid commands mixed with garbage, NULs, 8-bit bytes and huge
        /// lines. Without STARTTLS (whose refusal of pipelined commands
        /// depends on what arrived together) the replies do not depend on
        /// how the input is split.
        #[test]
        fn mixed_input_never_breaks_the_session(
            cfg in arb_cfg(),
            pieces in proptest::collection::vec(arb_piece(), 0..24),
            cuts in proptest::collection::vec(any::<proptest::sample::Index>(), 0..12),
            choices in proptest::collection::vec(any::<bool>(), 1..8),
        ) {
            let stream = pieces.concat();
            let as_sent: Vec<&[u8]> = pieces.iter().map(Vec::as_slice).collect();
            let sent = run(&cfg, &as_sent, &choices);
            let whole = run(&cfg, &[&stream], &choices);
            let split = run(&cfg, &cut(&stream, &cuts), &choices);
            if !cfg.tls_available {
                prop_assert_eq!(&sent, &whole);
                prop_assert_eq!(&split, &whole);
            }
        }
    }
}
