//! Fuzzes the SMTP command parser: it must never panic, and whatever parses
//! must survive a render / re-parse round trip unchanged (addresses on their
//! own via `Address: Display`, whole commands via `Command: Display`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::smtp::address::{Address, ForwardPath, ReversePath};
use sluice::smtp::command::{parse_command, Command};

fn check_address(a: &Address) {
    let text = a.to_string();
    let again = Address::parse(&text).unwrap_or_else(|e| panic!("{text:?} does not re-parse: {e}"));
    assert_eq!(&again, a, "address round trip through {text:?}");
    assert_eq!(
        again.local_part(),
        a.local_part(),
        "local part must be kept verbatim"
    );
}

fuzz_target!(|data: &[u8]| {
    let Ok(cmd) = parse_command(data) else {
        // Building the reply must not panic either.
        if let Err(e) = parse_command(data) {
            let _ = e.reply().to_bytes();
        }
        return;
    };
    match &cmd {
        Command::Mail(m) => {
            if let ReversePath::Address(a) = &m.from {
                check_address(a);
                assert!(
                    m.smtputf8 || !a.needs_smtputf8(),
                    "non-ASCII sender without SMTPUTF8"
                );
            }
        }
        Command::Rcpt(r) => {
            if let ForwardPath::Address(a) = &r.to {
                check_address(a);
            }
        }
        _ => {}
    }
    let line = cmd.to_string();
    let again = parse_command(line.as_bytes())
        .unwrap_or_else(|e| panic!("rendered {line:?} does not re-parse: {e:?}"));
    assert_eq!(again, cmd, "command round trip through {line:?}");
});
