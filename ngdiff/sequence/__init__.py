"""Sequential unlearning requests (`ngdiff sequence`): data.forget's sets forgotten one after another, each
request an ordinary run starting from the previous request's exported model, and after each request every
set scored again (the T x T matrix of docs/sequence.md)."""
