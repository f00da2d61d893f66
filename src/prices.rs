//! The price table: what an LLM call costs when the provider did not say.
//!
//! Money is counted in integer *micro-units* of the currency (a millionth),
//! so a sum over billions of events never drifts as a float would, and a
//! `u64` holds 18 trillion currency units. A call's cost is computed
//! exactly first: a table price has at most 3 decimals per million tokens,
//! so a token's price is a whole number of nano-units ($0.075 per million
//! is 75 per token) and every product is exact; the call's total is then
//! rounded once, to the nearest micro-unit, like a line of an invoice. A
//! reported `cost` is rounded the same way. The exposition divides once,
//! at the end.
//!
//! The default table (`prices.toml` in the repository) is compiled in, so
//! an installed binary prices without a file; `--prices FILE` replaces it.

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;

use crate::event::{Cost, CostSource, Event, EventBody, UNKNOWN_MODEL};

const DEFAULT: &str = include_str!("../prices.toml");

#[derive(Debug, thiserror::Error)]
pub enum PricesError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Parse(String),
}

/// One model's prices, in nano-units per token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Price {
    pub input: u64,
    pub cached_input: u64,
    pub cache_write: u64,
    pub output: u64,
}

/// A call's tokens, as a `response` event reports them. `prompt` includes
/// the cached and cache-written ones (as providers report them);
/// `reasoning` is billed as output, beside `completion`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt: u64,
    pub completion: u64,
    pub cached: u64,
    pub cache_write: u64,
    pub reasoning: u64,
}

impl Price {
    /// The cost of `usage` in nano-units, saturating (never wrapping).
    pub fn cost(&self, u: &Usage) -> u64 {
        let plain = u
            .prompt
            .saturating_sub(u.cached.saturating_add(u.cache_write));
        let parts = [
            (plain, self.input),
            (u.cached, self.cached_input),
            (u.cache_write, self.cache_write),
            (u.completion.saturating_add(u.reasoning), self.output),
        ];
        parts
            .iter()
            .map(|(tokens, price)| tokens.saturating_mul(*price))
            .fold(0u64, u64::saturating_add)
    }
}

#[derive(Debug, Clone)]
pub struct Prices {
    pub currency: String,
    /// When the prices were taken, as the file says.
    pub taken: String,
    models: HashMap<String, Price>,
    /// `provider/model` keys, by provider: looked up without building the
    /// joined key per event.
    by_provider: HashMap<String, HashMap<String, Price>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    currency: Option<String>,
    taken: String,
    #[serde(default)]
    models: HashMap<String, RawPrice>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrice {
    input: f64,
    cached_input: Option<f64>,
    cache_write: Option<f64>,
    output: f64,
}

/// Per million tokens → nano-units per token, refusing what cannot be
/// exact: negative, non-finite, absurd, or finer than 3 decimals.
fn per_token(model: &str, field: &str, per_million: f64) -> Result<u64, PricesError> {
    let bad = |why: &str| {
        PricesError::Parse(format!("models.\"{model}\".{field} = {per_million}: {why}"))
    };
    if !per_million.is_finite() || per_million < 0.0 {
        return Err(bad("must be a number ≥ 0"));
    }
    if per_million > 1_000_000.0 {
        return Err(bad("more than 1,000,000 per million tokens"));
    }
    let nanos = per_million * 1000.0;
    let rounded = nanos.round();
    if (nanos - rounded).abs() > 1e-6 {
        return Err(bad("at most 3 decimals (prices are counted exactly)"));
    }
    Ok(rounded as u64)
}

impl Prices {
    /// The table compiled into the binary.
    pub fn builtin() -> Prices {
        // The shipped file is checked by a unit test, so this cannot fail
        // in a released build; an empty table would only mark spend
        // incomplete, never wrong.
        Prices::parse(DEFAULT).unwrap_or_else(|_| Prices {
            currency: "USD".into(),
            taken: String::new(),
            models: HashMap::new(),
            by_provider: HashMap::new(),
        })
    }

    pub fn load(path: &Path) -> Result<Prices, PricesError> {
        let text = std::fs::read_to_string(path).map_err(|source| PricesError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Prices::parse(&text).map_err(|e| PricesError::Parse(format!("{}: {e}", path.display())))
    }

    pub fn parse(text: &str) -> Result<Prices, PricesError> {
        let file: File = toml::from_str(text).map_err(|e| PricesError::Parse(e.to_string()))?;
        let mut models = HashMap::with_capacity(file.models.len());
        let mut by_provider: HashMap<String, HashMap<String, Price>> = HashMap::new();
        for (name, raw) in file.models {
            let input = per_token(&name, "input", raw.input)?;
            let price = Price {
                input,
                cached_input: match raw.cached_input {
                    Some(p) => per_token(&name, "cached_input", p)?,
                    None => input,
                },
                cache_write: match raw.cache_write {
                    Some(p) => per_token(&name, "cache_write", p)?,
                    None => input,
                },
                output: per_token(&name, "output", raw.output)?,
            };
            match name.split_once('/') {
                Some((provider, model)) => {
                    by_provider
                        .entry(provider.to_owned())
                        .or_default()
                        .insert(model.to_owned(), price);
                }
                None => {
                    models.insert(name, price);
                }
            }
        }
        Ok(Prices {
            currency: file.currency.unwrap_or_else(|| "USD".into()),
            taken: file.taken,
            models,
            by_provider,
        })
    }

    /// The price of `model` (through `provider/model` first, when the
    /// event names its provider); `None`: unpriced, never free.
    pub fn price_of(&self, provider: Option<&str>, model: &str) -> Option<&Price> {
        provider
            .and_then(|p| self.by_provider.get(p)?.get(model))
            .or_else(|| self.models.get(model))
    }

    pub fn len(&self) -> usize {
        self.models.len() + self.by_provider.values().map(HashMap::len).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Nano-units → micro-units, to the nearest (half up).
pub fn micros_of(nanos: u64) -> u64 {
    nanos.saturating_add(500) / 1000
}

impl Prices {
    /// Prices every `response` that reports tokens and no cost, in place,
    /// before ingest journals the batch. A model the table does not know
    /// keeps no cost: counted as unpriced, never as free.
    pub fn price(&self, events: &mut [Event<'_>]) {
        for event in events {
            if let EventBody::Response {
                model,
                provider,
                tokens: Some(t),
                cost: cost @ None,
                ..
            } = &mut event.body
            {
                let model = model.as_ref().map_or(UNKNOWN_MODEL, |m| m.as_str());
                if let Some(price) = self.price_of(provider.as_ref().map(|p| p.as_str()), model) {
                    let usage = Usage {
                        prompt: t.prompt,
                        completion: t.completion,
                        cached: t.cached,
                        cache_write: t.cache_write,
                        reasoning: t.reasoning,
                    };
                    *cost = Some(Cost {
                        micros: micros_of(price.cost(&usage)),
                        source: CostSource::Table,
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_table_parses_and_prices_exactly() {
        let prices = Prices::parse(DEFAULT).expect("prices.toml parses");
        assert!(prices.len() >= 10, "the common models are in it");
        assert_eq!(prices.currency, "USD");
        let mini = prices.price_of(None, "gpt-4o-mini").expect("gpt-4o-mini");
        assert_eq!(
            *mini,
            Price {
                input: 150,
                cached_input: 75,
                cache_write: 150,
                output: 600
            }
        );
        // 1,000 prompt tokens of which 400 cached, 200 completion:
        // 600 × 150 + 400 × 75 + 200 × 600 = 240,000 nano-units.
        let usage = Usage {
            prompt: 1000,
            completion: 200,
            cached: 400,
            ..Usage::default()
        };
        assert_eq!(mini.cost(&usage), 240_000);
    }

    #[test]
    fn provider_overrides_and_unknown_models() {
        let prices = Prices::parse(
            "taken = \"2026-11-01\"\n[models.m]\ninput = 1\noutput = 2\n[models.\"p/m\"]\ninput = 3\noutput = 4\n",
        )
        .expect("parses");
        assert_eq!(prices.price_of(None, "m").map(|p| p.input), Some(1000));
        assert_eq!(prices.price_of(Some("p"), "m").map(|p| p.input), Some(3000));
        assert_eq!(prices.price_of(Some("q"), "m").map(|p| p.input), Some(1000));
        assert!(prices.price_of(None, "unknown").is_none());
    }

    #[test]
    fn inexact_or_bad_prices_are_refused() {
        for bad in ["input = 0.0001", "input = -1", "input = nan", "input = 1e9"] {
            let text = format!("taken = \"x\"\n[models.m]\n{bad}\noutput = 1\n");
            assert!(Prices::parse(&text).is_err(), "{bad}");
        }
        assert!(Prices::parse("taken = \"x\"\n[models.m]\ninput = 1\n").is_err());
        assert!(Prices::parse("taken = \"x\"\nsurprise = 1\n").is_err());
    }

    #[test]
    fn sums_saturate_instead_of_wrapping() {
        let p = Price {
            input: u64::MAX / 2,
            cached_input: 0,
            cache_write: 0,
            output: u64::MAX / 2,
        };
        let u = Usage {
            prompt: 10,
            completion: 10,
            ..Usage::default()
        };
        assert_eq!(p.cost(&u), u64::MAX);
        assert_eq!(Cost::reported(0.0125).micros, 12_500);
        assert_eq!(micros_of(1_499), 1);
        assert_eq!(micros_of(1_500), 2);
    }
}
