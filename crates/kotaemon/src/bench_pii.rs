//! `kotaemon bench pii`: PII guard throughput (mask + restore) on mixed English/Chinese text
//! with names, phones, emails, IDs and cards sprinkled in, on one core.

use clap::Args as ClapArgs;
use kotaemon_core::stages::pii_guard::recognize::Recognizers;
use kotaemon_core::stages::pii_guard::vault::{Replace, Vault};
use kotaemon_core::tools::contacts::{Contact, Directory};
use std::process::ExitCode;
use std::time::Instant;

#[derive(ClapArgs)]
pub struct Args {
    /// Megabytes of text to process.
    #[arg(long, default_value_t = 32)]
    megabytes: usize,
}

const SAMPLES: &[&str] = &[
    "Please ask Manager Zhang to call 13800138000 before the review; ",
    "会议改到明天上午10点，请张经理和李总监参加，电话010-62345678。",
    "The quarterly numbers look fine, revenue grew 12% and costs fell 3%. ",
    "把报告发给 zhang.wei@example.com，身份证号11010519491231002X已登记。",
    "Server 10.1.2.3 restarted at 02:00; card 6222020200112233446 was charged. ",
    "今天的天气不错，我们下午去公园散步，然后一起吃晚饭，讨论一下下周的计划。",
];

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let names = ["张伟", "李娜", "王芳", "刘洋", "陈静"];
    let mut contacts: Vec<Contact> = names
        .iter()
        .map(|n| Contact {
            name: n.to_string(),
            title: "经理".into(),
            ..Default::default()
        })
        .collect();
    // A realistic directory size for a small office.
    for i in 0..200 {
        contacts.push(Contact {
            name: format!("Person{i} Example"),
            ..Default::default()
        });
    }
    let recognizers =
        Recognizers::new(&Directory::new(contacts), &[]).map_err(anyhow::Error::msg)?;
    let mut text = String::new();
    let mut i = 0;
    while text.len() < 64 * 1024 {
        text.push_str(SAMPLES[i % SAMPLES.len()]);
        i += 1;
    }
    let rounds = (args.megabytes * 1024 * 1024 / text.len()).max(1);
    let started = Instant::now();
    let mut found = 0;
    for _ in 0..rounds {
        let vault = Vault::new(Replace::Pseudonym);
        let masked = vault.mask(&recognizers, &text);
        let restored = vault.restore(&masked);
        anyhow::ensure!(restored == text, "mask then restore changed the text");
        found += vault.found().len();
    }
    let secs = started.elapsed().as_secs_f64();
    let mb = (rounds * text.len()) as f64 / (1024.0 * 1024.0);
    println!(
        "pii guard: {mb:.0} MiB of mixed en/zh text in {secs:.2} s = {:.1} MiB/s (mask + restore, one core, 205 contacts); {} values masked",
        mb / secs,
        found
    );
    Ok(ExitCode::SUCCESS)
}
