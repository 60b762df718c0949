import { parseArgs, type ParseArgsConfig } from 'node:util';

/** A mistake in the command line: one line on stderr and exit status 2. */
export class UsageError extends Error {}

export interface OptionHelp {
  type: 'string' | 'boolean';
  short?: string;
  /** How the option is written in help, e.g. `--to TAG`. */
  usage: string;
  help: string;
}

export interface CommandSpec {
  /** `migrate down`, `start`... */
  name: string;
  /** The synopsis after `keel `, as the README's command table shows it. */
  synopsis: string;
  summary: string;
  options: Record<string, OptionHelp>;
}

export function commandHelp(spec: CommandSpec): string {
  const options = Object.values(spec.options);
  const width = Math.max(12, ...options.map((o) => o.usage.length)) + 2;
  const lines = [`Usage: keel ${spec.synopsis}`, '', `  ${spec.summary}`, '', 'Options:'];
  for (const option of [...options, { usage: '-h, --help', help: 'show this help' }]) lines.push(`  ${option.usage.padEnd(width)}${option.help}`);
  return `${lines.join('\n')}\n`;
}

export type Parsed = { help: true } | { help: false; values: Record<string, string | boolean | undefined>; positionals: string[] };

/**
 * node:util parseArgs in strict mode, its errors (unknown option, missing value, stray argument)
 * turned into one-line UsageErrors that name the command and point at its --help.
 */
export function parseCommand(spec: CommandSpec, args: string[]): Parsed {
  const options: NonNullable<ParseArgsConfig['options']> = { help: { type: 'boolean', short: 'h' } };
  for (const [name, option] of Object.entries(spec.options)) options[name] = { type: option.type, ...(option.short ? { short: option.short } : {}) };
  let parsed;
  try {
    parsed = parseArgs({ args, options, strict: true, allowPositionals: false });
  } catch (error) {
    throw new UsageError(`keel ${spec.name}: ${usageProblem(error)} (see keel ${spec.name} --help)`);
  }
  if (parsed.values.help) return { help: true };
  return { help: false, values: parsed.values as Record<string, string | boolean | undefined>, positionals: parsed.positionals };
}

function usageProblem(error: unknown): string {
  const { code, message } = error as { code?: string; message?: string };
  const quoted = /'([^']+)'/.exec(message ?? '')?.[1] ?? '';
  switch (code) {
    case 'ERR_PARSE_ARGS_UNKNOWN_OPTION':
      return `unknown option ${quoted}`;
    case 'ERR_PARSE_ARGS_INVALID_OPTION_VALUE':
      // "Option '--to <value>' argument missing" or "Option '--yes' does not take an argument".
      return /argument missing/.test(message ?? '') ? `${quoted.replace(/ <value>$/, '')} needs a value` : `${quoted.split(' ')[0]} takes no value`;
    case 'ERR_PARSE_ARGS_UNEXPECTED_POSITIONAL':
      return `unexpected argument "${quoted}"`;
    default:
      return message ?? String(error);
  }
}
