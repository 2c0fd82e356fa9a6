"""Subcommands that list what is available: policies and backends."""

from __future__ import annotations

import argparse
import sys

from safetypairs.cli.common import CLIError


def _cmd_policies(args: argparse.Namespace) -> int:
    from safetypairs.policy import builtin_policies, load_policy

    names = [args.policy] if args.policy else builtin_policies()
    if args.render:
        from safetypairs.backends.vlm_guards import render_guard_prompt

        if not args.policy:
            raise CLIError("--render needs a policy name or file")
        policy = load_policy(args.policy)
        if args.category is not None and args.category not in policy.categories:
            raise CLIError(f"unknown category {args.category!r}; allowed: {', '.join(policy.categories)}")
        scope = "category" if args.category else "all"
        sys.stdout.write(render_guard_prompt(args.render, policy, args.category, scope).rstrip("\n") + "\n")
        return 0
    for name in names:
        policy = load_policy(name)
        sys.stdout.write(f"{policy.id}: {policy.description}\n")
        for cat in policy.categories.values():
            if args.lexicon and cat.lexicon:
                sys.stdout.write(f"  {cat.code}  {cat.name}; lexicon: {', '.join(cat.lexicon)}\n")
                continue
            lex = f" (lexicon: {len(cat.lexicon)} words; --lexicon lists them)" if cat.lexicon else ""
            sys.stdout.write(f"  {cat.code}  {cat.name}{lex}\n")
    return 0


def add_policies(sub: argparse._SubParsersAction) -> None:
    """The ``policies`` subcommand."""
    p = sub.add_parser("policies", help="list the built-in policies and their categories",
                       description="List built-in safety policies (or one policy file) with their categories.")
    p.add_argument("policy", nargs="?", help="a built-in policy name or a .yaml path (default: all built-in)")
    p.add_argument("--render", choices=("llavaguard", "shieldgemma2", "hf-vlm"),
                   help="print the exact policy prompt this guard gets, in its trained format")
    p.add_argument("--category", help="with --render: the row's category (scope=category; LlavaGuard marks "
                                      "the others as not violated in this context)")
    p.add_argument("--lexicon", action="store_true",
                   help="list each category's lexicon words (what the offline template instructor, ocr-inpaint "
                        "editor and ocr-lexicon judge/guard read in captions)")
    p.set_defaults(func=_cmd_policies)


def _spec_usage(alias: str, cls: type) -> str:
    """How a backend's spec is written, from its declaration (``diffusers:<hub id or local path>[,key=value,...]``)."""
    argument = getattr(cls, "ARGUMENT", None)
    text = alias
    if argument is not None:
        text += f"[:{argument.usage}]" if argument.default is not None else f":{argument.usage}"
    if getattr(cls, "OPTIONS", None):
        text += "[,key=value,...]" if argument is not None else "[:key=value,...]"
    return text


def _backend_lines(kind: str, alias: str) -> list[str]:
    """One backend: alias, origin and target, its summary and capabilities, its spec and its options."""
    from safetypairs.backends import registry
    from safetypairs.backends.base import missing_members
    from safetypairs.backends.options import option_help

    head = f"  {alias}  ({registry.origin(kind, alias)}: {registry.REGISTRY[kind][alias]})"
    try:
        cls = registry.backend_class(kind, alias)
        declared = registry.declares_options(cls)
    except ValueError as err:
        cause = err.__cause__ or err
        return [f"{head}  cannot be imported: {type(cause).__name__}: {cause}"]
    summary = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
    notes = [f"does not implement {', '.join(gaps)}"] if (gaps := missing_members(kind, cls)) else []
    if kind == "editors":
        notes.append("takes masks" if getattr(cls, "takes_mask", False) else "takes no mask")
    lines = [head + (f"  [{'; '.join(notes)}]" if notes else ""), f"      {summary}"]
    lines += [f"      spec: {_spec_usage(alias, cls)}"] if declared else []
    options = getattr(cls, "OPTIONS", None) or {}
    width = max(map(len, options), default=0)
    lines += [f"      {name.ljust(width)}  {option_help(entry)}" for name, entry in options.items()] or ["      (no options)"]
    return lines


def _cmd_backends(args: argparse.Namespace) -> int:
    from safetypairs.backends.registry import KINDS, available

    for kind in [args.kind] if args.kind else KINDS:
        sys.stdout.write(f"{kind}:\n")
        for alias in available(kind):
            sys.stdout.write("\n".join(_backend_lines(kind, alias)) + "\n")
    return 0


def add_backends(sub: argparse._SubParsersAction) -> None:
    """The ``backends`` subcommand."""
    from safetypairs.backends.registry import ENTRY_POINT_GROUP, KINDS

    p = sub.add_parser("backends", help="list the registered backends of each kind with their options",
                       description=("List instructors, editors, judges, guards and encoders: built-in ones, those "
                                    "added with safetypairs.backends.registry.register() and those of other packages' "
                                    f"'{ENTRY_POINT_GROUP}' entry points ('<kind>.<alias>' = 'module:Class'). "
                                    "Options go in the spec: alias:<arg>,key=value,..."))
    p.add_argument("kind", nargs="?", choices=KINDS, help="only this kind (default: all)")
    p.set_defaults(func=_cmd_backends)

