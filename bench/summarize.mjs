// Turns bench/out/raw.tsv (one line per measurement) into a Markdown table of medians and ratios.
import { readFileSync } from 'node:fs';
import { cpus, totalmem } from 'node:os';
import process from 'node:process';

const print = (line = '') => process.stdout.write(`${line}\n`);
const median = (values) => {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
};

const cases = new Map();
for (const line of readFileSync(process.argv[2], 'utf8').split('\n').filter(Boolean)) {
  const [name, rate, p50, p99, errors] = line.split('\t');
  if (!cases.has(name)) cases.set(name, []);
  cases.get(name).push({ rate: Number(rate), p50, p99, errors: Number(errors) || 0 });
}

print(`Run ${new Date().toISOString().slice(0, 16)}Z; ${cpus().length} cores (${cpus()[0]?.model ?? '?'}), ${Math.round(totalmem() / 2 ** 30)} GiB, Node ${process.version}`);
print();
print('| case | runs | median req/s (tps) | all runs | p50 | p99 | errors |');
print('| --- | --- | --- | --- | --- | --- | --- |');
const medians = {};
for (const [name, runs] of cases) {
  medians[name] = median(runs.map((r) => r.rate));
  const mid = runs.find((r) => r.rate === medians[name]) ?? runs[0];
  const all = runs.map((r) => Math.round(r.rate)).join(', ');
  const errors = runs.reduce((n, r) => n + r.errors, 0);
  print(`| ${name} | ${runs.length} | ${Math.round(medians[name])} | ${all} | ${mid.p50} | ${mid.p99} | ${errors} |`);
}
print();
const pct = (a, b) => `${Math.round((100 * a) / b)} %`;
const pgbench = Object.entries(medians).filter(([name]) => name.startsWith('pgbench-'));
if (medians['postgres-get-project'] && pgbench.length) {
  const [bestName, best] = pgbench.reduce((a, b) => (b[1] > a[1] ? b : a));
  print(`- PostgreSQL read vs pgbench's best (${bestName}, the database's ceiling): ${pct(medians['postgres-get-project'], best)}`);
  for (const [name, tps] of pgbench) print(`- PostgreSQL read vs ${name}: ${pct(medians['postgres-get-project'], tps)}`);
  print(`- PostgreSQL read vs the bare Fastify baseline: ${pct(medians['postgres-get-project'], medians['baseline-fastify'])}`);
}
if (medians['embedded-get-project']) {
  print(`- Embedded read vs the bare Fastify baseline: ${pct(medians['embedded-get-project'], medians['baseline-fastify'])}`);
}
