"""One round's transaction on a site's privacy books: its ledger read, the run admitted, the
earlier spend on its records found, the round or release authorized, and its charge persisted
(ledger first, then the receipt) before anything is sent.

Open `Books` under the state folder's lock (`common.privacy.ledger.exclusive`) and keep it for
the one round: every decision about the site's budget is made here, on what the ledger holds.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

from common.errors import Refusal
from common.privacy.accounting import Account, HistoryEntry, epsilon_from_history
from common.privacy.enforcement import (
    LocalPlan,
    PrivacyTerms,
    authorize_release,
    authorize_round,
    check_round_count,
)
from common.privacy.ledger import (
    LEDGER_FILE,
    Ledger,
    RunEntry,
    load_ledger,
    save_ledger,
)
from common.privacy.lineage import related, remember
from common.privacy.policy import SitePolicy
from common.privacy.receipts import (
    EVALUATE,
    RECEIPTS_FILE,
    TRAIN,
    Receipt,
    append_receipt,
    read_receipts,
)
from common.privacy.release import release_entry
from common.privacy.replay import SENT_FOLDER, SentUpdate, load_sent, save_sent
from common.protocol import update_digest

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class RoundKey:
    """Which round of which run the books are open for."""

    run_key: str  # the run's name in the ledger, stable when the run is resumed
    server_round: int
    flower_run_id: int = 0  # the Flower run the message belongs to (its run key is bound to it)


@dataclass(frozen=True, kw_only=True)
class DataVersion:
    """The data a round uses: its version (content digest) and its records' keys (lineage)."""

    version: str
    record_keys: frozenset[str]


class Books:
    """A site's ledger, open for one round of one run (under the state folder's lock)."""

    def __init__(
        self, state_dir: Path, key: RoundKey, data: DataVersion, terms: PrivacyTerms
    ) -> None:
        self.state_dir, self.key, self.data, self.terms = state_dir, key, data, terms
        self.ledger = open_ledger(state_dir)
        self.entry = admit(self.ledger, key, data.version)
        self.prior = self._prior_spend()

    def _prior_spend(self) -> list[HistoryEntry]:
        """What earlier runs spent on records this run uses (`budget-scope = "dataset"`)."""
        if self.terms.budget_scope != "dataset":
            return []
        versions = related(
            self.state_dir, self.data.version, self.data.record_keys, self.ledger.datasets()
        )
        return self.ledger.prior_history(versions, self.key.run_key)

    @property
    def trained(self) -> bool:
        """Whether this round of the run was trained (and charged) already."""
        return self.entry is not None and self.key.server_round in self.entry.rounds

    @property
    def evaluated(self) -> bool:
        """Whether this round of the run was evaluated (and released) already."""
        return self.entry is not None and self.key.server_round in self.entry.evaluated

    def authorize_training(self, policy: SitePolicy, plan: LocalPlan) -> Account | None:
        """The run's account for this round's steps (None: the round trains without DP)."""
        if self.terms.dp:
            return authorize_round(self.terms, self.entry, self.prior, policy, plan)
        check_round_count(self.entry, policy)
        return None

    def authorize_release(self, plan: LocalPlan) -> Account | None:
        """The run's account for one noisy release (None: the site releases exactly)."""
        if not self.terms.private_releases:
            return None
        return authorize_release(self.terms, self.entry, self.prior, plan)

    def resend(self, global_sha256: str) -> tuple[SentUpdate, Receipt] | None:
        """The update sent for this round from the same global parameters and its receipt, if
        kept: a resumed server asks a round again, and gets the same update for no new spend."""
        sent = load_sent(self.state_dir, self.key.run_key)
        if (
            sent is None
            or sent.server_round != self.key.server_round
            or sent.global_sha256 != global_sha256
        ):
            return None
        receipts = [
            r
            for r in read_receipts(self.state_dir)
            if r.run_id == self.key.run_key and r.round == self.key.server_round and r.kind == TRAIN
        ]
        if not receipts or receipts[-1].update_sha256 != update_digest(sent.state):
            return None
        log.info(
            "round %d asked again from the same global parameters; sending the update "
            "already sent and charged (nothing new is spent)",
            self.key.server_round,
        )
        return sent, receipts[-1]

    def keep_sent(self, sent: SentUpdate) -> None:
        """Keep what this round sends, so that the round asked again sends it again."""
        save_sent(self.state_dir, self.key.run_key, sent)

    def charge_training(
        self, account: Account | None, *, sent_sha256: str, secure: SecureStep | None = None
    ) -> Receipt:
        """Persist the round's spend (`account` after its steps; None: trained without DP).

        A round without DP keeps the run's DP account (its history is never lost) and is
        recorded as unprotected. `secure`: the round was one step inside secure aggregation,
        its last history entry the noise the sum carries under the stated assumption.
        """
        entry = self._entry()
        before = entry.account.steps if entry.account else 0
        steps = entry.secure_steps
        if secure is not None and account is not None:
            steps = (*steps, (len(account.history) - 1, secure.own_noise_multiplier))
        self._save(
            replace(
                entry,
                account=account or entry.account,
                rounds=(*entry.rounds, self.key.server_round),
                unprotected_rounds=entry.unprotected_rounds
                + (() if account else (self.key.server_round,)),
                secure_steps=steps,
            )
        )
        last = account.history[-1] if account else (0.0, 0.0, 0)
        return self._receipt(
            account,
            kind=TRAIN,
            sha256=sent_sha256,
            noise=last[0],
            sample_rate=last[1],
            steps=(account.steps - before) if account else 0,
            secure=secure,
        )

    def charge_release(self, account: Account, *, kind: str, sha256: str) -> Account:
        """Persist one release's spend (`account` before it); the account after it."""
        after = account.after([*account.history, release_entry(account.release_noise_multiplier)])
        entry = self._entry()
        self._save(
            replace(
                entry,
                account=after,
                evaluated=entry.evaluated + ((self.key.server_round,) if kind == EVALUATE else ()),
            )
        )
        self._receipt(
            after,
            kind=kind,
            sha256=sha256,
            noise=after.release_noise_multiplier,
            sample_rate=1.0,
            steps=1,
        )
        return after

    def record_exact_evaluation(self) -> None:
        """Record that this round was evaluated, released exactly (nothing to charge)."""
        entry = self._entry()
        self._save(replace(entry, evaluated=(*entry.evaluated, self.key.server_round)))

    def _entry(self) -> RunEntry:
        return self.entry or RunEntry(dataset=self.data.version, account=None)

    def _save(self, entry: RunEntry) -> None:
        """Write the run's entry (with this Flower run and this data) and remember the data."""
        flower_runs = (
            entry.flower_runs
            if self.key.flower_run_id in entry.flower_runs
            else (*entry.flower_runs, self.key.flower_run_id)
        )
        self.entry = replace(entry, dataset=self.data.version, flower_runs=flower_runs)
        self.ledger = self.ledger.with_run(self.key.run_key, self.entry)
        # the version's record keys first: a spend on the books always finds its records
        remember(self.state_dir, self.data.version, self.data.record_keys)
        save_ledger(self.state_dir, self.ledger)

    def _receipt(
        self,
        account: Account | None,
        *,
        kind: str,
        sha256: str,
        noise: float,
        sample_rate: float,
        steps: int,
        secure: SecureStep | None = None,
    ) -> Receipt:
        receipt = Receipt(
            run_id=self.key.run_key,
            round=self.key.server_round,
            noise_multiplier=noise,
            sample_rate=sample_rate,
            steps=steps,
            accountant=account.accountant if account else "none",
            epsilon=account.epsilon if account else None,
            delta=account.delta if account else None,
            scope_epsilon=self.scope_epsilon(account),
            budget_scope=self.terms.budget_scope,
            update_sha256=sha256,
            dataset_sha256=self.data.version,
            time=Receipt.now(),
            kind=kind,
            cohort=secure.cohort if secure else 0,
            noise_shares=secure.noise_shares if secure else 0,
            colluders=secure.colluders if secure else 0,
            fallback_epsilon=self.fallback_epsilon(account) if account and secure else None,
        )
        append_receipt(self.state_dir, receipt)
        return receipt

    def scope_epsilon(self, account: Account | None) -> float | None:
        """The epsilon over the budget scope: the run's, composed with the earlier runs' spend."""
        if account is None:
            return None
        if not self.prior:
            return account.epsilon
        return epsilon_from_history(
            [*self.prior, *account.history], delta=account.delta, accountant=account.accountant
        )

    def fallback_epsilon(self, account: Account) -> float:
        """The epsilon over the budget scope if the secure sums' other sites all colluded: each
        secure step at the noise of the site's own share alone."""
        own = dict(self._entry().secure_steps)
        history = [(own.get(i, sigma), q, n) for i, (sigma, q, n) in enumerate(account.history)]
        if any(sigma <= 0 for sigma, _, _ in history):
            return math.inf
        return epsilon_from_history(
            [*self.prior, *history], delta=account.delta, accountant=account.accountant
        )


@dataclass(frozen=True, kw_only=True)
class SecureStep:
    """A round trained inside secure aggregation, as the ledger and the receipt record it."""

    cohort: int  # sites in the round's cohort
    noise_shares: int  # d: honest shares the sum's noise multiplier z assumes
    colluders: int  # the site's policy's assumption
    own_noise_multiplier: float  # z / sqrt(d): the site's own share alone


def open_ledger(state_dir: Path) -> Ledger:
    """The site's ledger; refuses while receipts or sent updates exist without it.

    A ledger deleted beside its receipts would give the site a fresh budget: the site stops
    until its operator rebuilds the ledger from the receipts (`fedfusion privacy rebuild-ledger`).
    """
    sent = state_dir / SENT_FOLDER
    if not (state_dir / LEDGER_FILE).exists() and (
        (state_dir / RECEIPTS_FILE).exists() or (sent.is_dir() and any(sent.iterdir()))
    ):
        raise Refusal(
            f"{state_dir} holds privacy receipts or sent updates but no "
            f"{LEDGER_FILE}: the spend they record would be forgotten. Restore the "
            "ledger from a backup, or rebuild it from the receipts with `fedfusion "
            f"privacy rebuild-ledger {state_dir} --reason ...`.",
            reason="state-incomplete",
        )
    return load_ledger(state_dir)


def admit(ledger: Ledger, key: RoundKey, version: str) -> RunEntry | None:
    """The run's ledger entry, once the run key is the Flower run's and the data is the run's."""
    bound = ledger.run_key_of(key.flower_run_id)
    if bound is not None and bound != key.run_key:
        raise Refusal(
            f"Flower run {key.flower_run_id} trains at this site under run key "
            f"{bound!r}; a second run key ({key.run_key!r}) in the same run would "
            "start a second budget.",
            reason="run-key-conflict",
        )
    entry = ledger.run(key.run_key)
    if entry and entry.dataset != version and (entry.rounds or entry.evaluated):
        raise Refusal(
            "the site's data changed during this run; its privacy plan no longer "
            "holds. Restore the data or start a new run.",
            reason="data-changed",
        )
    return entry
