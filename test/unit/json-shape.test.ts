/** A JSON text's depth and values read before it is parsed (utils/json-shape.ts). */
import { describe, expect, it } from 'vitest';

import { jsonShapeIssue } from '../../src/utils/json-shape.js';

const nested = (depth: number, inner = '1') => '['.repeat(depth) + inner + ']'.repeat(depth);

describe('jsonShapeIssue', () => {
  it('finds the container that nests past the depth, named by its keys and indices', () => {
    expect(jsonShapeIssue(`{"a":${nested(3)}}`, 4, 100)).toBeUndefined();
    expect(jsonShapeIssue(`{"a":${nested(4)}}`, 4, 100)).toEqual({ kind: 'depth', path: ['a', 0, 0, 0] });
    expect(jsonShapeIssue(`{"x":1,"tools":[{},{"function":{"parameters":${nested(10)}}}]}`, 6, 100)).toEqual({ kind: 'depth', path: ['tools', 1, 'function', 'parameters', 0, 0] });
    // 100,000 levels: found where the bound is passed, without reading the rest.
    expect(jsonShapeIssue(`{"metadata":{"a":${nested(100_000)}}}`, 72, 250_000)?.path).toHaveLength(72);
  });

  it('reads strings as strings: brackets, commas, colons and escaped quotes in them (keys too) are text', () => {
    const text = JSON.stringify({ 'k"[{': '[[[[,,,,:"\\"]]]', n: ['\\', '"', 'a\\"b'], deep: [[['x']]] });
    expect(jsonShapeIssue(text, 4, 100)).toBeUndefined();
    expect(jsonShapeIssue(text, 3, 100)).toEqual({ kind: 'depth', path: ['deep', 0, 0] });
    expect(jsonShapeIssue(JSON.stringify({ 'a"b\\': [[1]] }), 2, 100)).toEqual({ kind: 'depth', path: ['a"b\\', 0] });
  });

  it('counts values (items and members, at any depth) and names where the count passes the bound', () => {
    const body = JSON.stringify({ model: 'm', messages: [{ role: 'user', content: 'a,b,c' }], logit_bias: Object.fromEntries(Array.from({ length: 50 }, (_, i) => [String(i), 1])) });
    expect(jsonShapeIssue(body, 10, 60)).toBeUndefined();
    // Down to the member where the count passed it.
    expect(jsonShapeIssue(body, 10, 40)).toEqual({ kind: 'values', path: ['logit_bias', expect.any(String)] });
    expect(jsonShapeIssue(`[${'[],'.repeat(1_000_000)}[]]`, 10, 1000)).toEqual({ kind: 'values', path: [499] });
  });

  it('leaves what is not JSON to the parse', () => {
    for (const text of ['{"a":"unterminated', ']]]]', '', 'null', '{"a":[1,2}']) expect(jsonShapeIssue(text, 2, 5)).toBeUndefined();
    // A key whose escapes are not JSON's, on the way to the bound: named as written, not thrown at.
    expect(jsonShapeIssue(`{"a\\q\\u12":${nested(3)}}`, 2, 100)).toEqual({ kind: 'depth', path: ['a\\q\\u12', 0] });
  });
});
