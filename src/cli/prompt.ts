import { createInterface } from 'node:readline/promises';

import { UsageError } from './args.js';

/** Whether questions can be asked: standard input is a terminal. */
export function interactive(): boolean {
  return process.stdin.isTTY === true;
}

/** Asks at the terminal without echoing what is typed (a password). Ctrl-C cancels. */
export async function askHidden(question: string): Promise<string> {
  const stdin = process.stdin;
  // Echo off before the prompt shows: whatever is typed after seeing it is never echoed.
  stdin.setRawMode(true);
  process.stderr.write(question);
  stdin.setEncoding('utf8');
  stdin.resume();
  try {
    return await new Promise<string>((done, fail) => {
      let typed = '';
      const onData = (chunk: string) => {
        for (const char of chunk) {
          if (char === '\r' || char === '\n' || char === '\u0004') {
            stdin.off('data', onData);
            done(typed);
            return;
          }
          if (char === '\u0003') {
            stdin.off('data', onData);
            fail(new UsageError('cancelled'));
            return;
          }
          if (char === '\u007f' || char === '\b') typed = typed.slice(0, -1);
          else typed += char;
        }
      };
      stdin.on('data', onData);
    });
  } finally {
    stdin.setRawMode(false);
    stdin.pause();
    process.stderr.write('\n');
  }
}

/** A yes/no question at the terminal; anything but y/yes is no. */
export async function confirm(question: string): Promise<boolean> {
  const rl = createInterface({ input: process.stdin, output: process.stderr });
  try {
    const answer = await rl.question(`${question} [y/N] `);
    return /^y(es)?$/i.test(answer.trim());
  } finally {
    rl.close();
  }
}

/** The first line of standard input when it is not a terminal (a pipe or a file). */
export async function readFirstLine(): Promise<string> {
  const rl = createInterface({ input: process.stdin, terminal: false });
  try {
    for await (const line of rl) return line;
    return '';
  } finally {
    rl.close();
  }
}
